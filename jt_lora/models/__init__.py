"""GPT-2 and its files: the model, checkpoint readers (HF, torch pickles, microsoft/LoRA), the
GPT-2 tokenizer, writing models and adapters, and building a model from flags or an adapter dir."""
