"""Fine-tuning: the trainer, the reference AdamW and schedules, the data loader, and the work_dir
a run owns (checkpoints, resume, logs)."""
