"""Shared infrastructure: everything here serves every phase and every method (SD-Zero, RFT, GRPO, OPSD, ...).

Core (pure Python/torch; never imports vLLM, Ray or torch.distributed; `tests/unit/test_import_boundary.py`):
    config        typed dataclass configs: defaults < YAML < dotted CLI overrides
    storage       atomic writes, fsync'ed JSONL, the committed batch log every data stage writes through
    problems      Problem(x, answer, solution, tests, extras) and load_problems (HF / JSON / JSONL / parquet)
    prompts       chat(x), the student and teacher prompts, the P_r block (the one place it is written)
    answers       final-answer extraction and the answer-equivalence vote shared by rewards and evaluation
    rewards/      the reward-source seam: ground truth (math-verify, code sandbox) or none, group-aware
    worker_pool   killable worker processes with a hard per-item deadline (the verifiers run in it)
Adapters (one per external system; heavy imports inside):
    generation    GenerationBackend protocol + vLLM / transformers backends
    distributed   torch.distributed process group, FSDP2, DCP state
    checkpoints   atomic resumable checkpoints and the Hugging Face export
    training      the FSDP2 global-token-mean optimizer step (SFT and the Phase-2 learner)
    target_logits hidden states at target positions -> chunked lm_head (SFT, learner, teacher)
    run_log       metrics.jsonl (+ W&B / TensorBoard)
"""
