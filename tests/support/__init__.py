"""Helpers the tests share: the official reference (`reference`), the authors' code transcribed
(`authors`, `paper_samplers`), real and generated data (`shared`), the loop-based prompt
reference (`prompts`), and the training subprocesses (`train_runner`, `train_hooks`,
`multihost`, `toy_data`)."""
