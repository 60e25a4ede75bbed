"""Fine-tuning on the node: LoRA adapters trained from OpenAI chat files (docs/fine-tuning.md).

Pure parts import nothing heavy: `hparams` (OpenAI hyperparameters -> training settings),
`adapter` (the vLLM-compatibility rules for a saved adapter), `resolver` (vLLM LoRA resolver
plugin; vLLM imported only inside vLLM), `runner` (the lease client). `trainer` needs torch,
transformers and peft (requirements-torch.txt) and is imported only when a job runs.
"""
