"""SLIM: rationale generation (teacher/student), LoRA distillation, serving and rationale vectors."""
