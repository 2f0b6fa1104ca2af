"""Phase 2 of SD-Zero: on-policy self-distillation from the frozen SRT teacher.

May import `self_revision_training` (prompts, grading, generation, distributed); never the reverse.
"""
