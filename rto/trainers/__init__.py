"""Trainers: `sft`, `rm`, `dpo` (offline, sharing `offline.fit`)."""
