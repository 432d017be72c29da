"""ML layer: torch / transformers / peft / bitsandbytes. Never imports ipywidgets."""
