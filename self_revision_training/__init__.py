"""Phase 1 of SD-Zero (self-revision data and two-stage SFT) and the shared infrastructure of every phase.

    shared/        used by every phase and method: config, data, prompts, rewards, generation, training
    collect        entry point: Phase 1a resumable self-revision collection
    revision_data  the self-revision record schema and its statistics
    stage_split    cleaning, de-duplication and the Stage-1 / Stage-2 split
    prepare_data   entry point: verified tuples -> SFT stage files
    sft_data       SFT records -> token ids and labels; the per-step batch sampler
    sft_loss       completion-only cross-entropy
    sft            entry point: one SFT stage with FSDP2
    embedded       entry point: the offline quickstart model and task
Phase 2 (`self_distillation`) may import this package; this package never imports Phase 2.
"""
