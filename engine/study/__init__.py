"""The PPO-or-DPO study on the built-in task (`fusealign compare`): the task itself (`task`: tokenizer, tiny
model config, data, the hidden ground-truth reward — also what the trainers' `--model builtin` / `--data builtin`
read), the presets, the pipeline over seeds (`compare`), intervals and interpolation (`stats`) and the report
(`report`). Nothing here is imported by `import fusealign.engine`; `task` imports nothing from the engine.
"""
