"""Phase 1 of SD-Zero: self-revision data collection and two-stage SFT (the SRT model).

Shared core used by every phase: `config` (typed configs), `prompts` (chat template, instruction,
outcome-conditioned phrases), `grading` (math verifier), `code_sandbox` (code verifier),
`problems` (dataset loading).
"""
