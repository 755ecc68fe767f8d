"""SLIM: teacher chain-of-thought rationales, LoRA distillation into a small student, rationale vectors.

Stages (each a `Stage` of `eval.stage`, a folder of the run, a table of the presets, a command):
  slim-teacher-rationales  rationales.TeacherRationalesStage  `slim generate-rationales`  records.jsonl
  slim-student             finetune.SlimStudentStage          `slim finetune-student`     LoRA adapter
  slim-student-rationales  student.StudentRationalesStage     `slim generate`             records.jsonl
  profile-rationales       profile.ProfileRationalesStage     `slim profile`              no-LLM control records
  quality                  quality.QualityStage               `slim quality`              quality.json, quality.md
  vectors                  encode.VectorsStage                `slim encode`               LanceDB tables
  vectors-profile          encode.ProfileVectorsStage         `slim encode-profile`       the same, for the control
Serving: serve.Server(model_path, adapter) as a context manager -> .base_url, .model_name (`slim serve`).
Modules import their heavy dependencies lazily, so `import slim` stays cheap.
"""
