"""Writes the workshop notebooks under notebooks/ (run after editing; the .ipynb files are committed)."""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# sftkit: start here\n\n"
       "This notebook checks the install, loads the bundled model "
       "(**SmolLM2-135M-Instruct**, 135M parameters, works offline) and chats with it.\n\n"
       "Run the cells from top to bottom with **Shift+Enter**."),
    md("## 1. Is everything installed?\n\n"
       "`sftkit.doctor()` lists the library versions, your CPU/GPU and memory, and whether the "
       "default model is ready. Every problem comes with a `fix:` line."),
    code("import sftkit\n\nsftkit.doctor()"),
    md("## 2. What will run where?\n\n"
       "sftkit picks the device and precision for you and says why. On a laptop without a GPU it "
       "trains LoRA adapters in fp32 (half precision is ~100x slower on most CPUs); on an NVIDIA "
       "GPU it uses QLoRA: 4-bit NF4 weights with bf16 compute."),
    code("print(sftkit.plan_load().describe())"),
    md("## 3. Load the model\n\n"
       "The first load converts the bundled GGUF file to a fast cache (about half a minute, "
       "once); after that it loads in well under a second. `load_model` returns "
       "`(model, tokenizer)`, and `.report` says what it did."),
    code('loaded = sftkit.load_model("default")\n'
         "model, tokenizer = loaded\n"
         "print(loaded.report.summary())"),
    md("## 4. Chat with it\n\n"
       "Chat models expect their own prompt format. `apply_chat_template` writes it for you: "
       "look at the special tokens (`<|im_start|>`, `<|im_end|>`) around each turn."),
    code('import torch\n\n'
         'messages = [{"role": "user", "content": "What is the capital of France?"}]\n'
         'print(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))'),
    code('def ask(question, max_new_tokens=40):\n'
         '    enc = tokenizer.apply_chat_template(\n'
         '        [{"role": "user", "content": question}],\n'
         '        add_generation_prompt=True, return_tensors="pt", return_dict=True,\n'
         '    ).to(model.device)\n'
         '    with torch.no_grad():\n'
         '        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)\n'
         '    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)\n\n'
         'print(ask("What is the capital of France?"))'),
    md("## 5. The same model in 4 bits\n\n"
       "4-bit NF4 weights take about a third of the memory. On a CPU that is the only gain "
       "(it runs slower); on a GPU it is what lets a large model fit: that is the *Q* in QLoRA."),
    code('small = sftkit.load_model("default", quantization="4bit")\n'
         'print(f"fp32: {loaded.report.footprint_bytes / 2**20:.0f} MiB, "\n'
         '      f"4-bit: {small.report.footprint_bytes / 2**20:.0f} MiB")'),
    md("## Next\n\nThe next notebooks build a prompt template, pick the layers to train, and run a "
       "fine-tune you can watch and stop."),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "sftkit", "display_name": "sftkit (Python 3)", "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
out = Path(__file__).resolve().parents[1] / "notebooks" / "00_start_here.ipynb"
nbf.write(nb, str(out))
print("wrote", out)
