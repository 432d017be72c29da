"""Writes the workshop notebooks under notebooks/ (run after editing; the .ipynb files are committed)."""

import copy
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# sftkit: start here (the install check)\n\n"
       "This notebook checks the install, loads the bundled model "
       "(**SmolLM2-135M-Instruct**, 135M parameters, works offline) and chats with it. If every cell "
       "runs, the laptop is ready for the workshop: go on with **00_quickstart.ipynb**.\n\n"
       "Run the cells from top to bottom with **Shift+Enter**."),
    md("## 1. Is everything installed?\n\n"
       "`sftkit.doctor()` lists the library versions, your CPU/GPU and memory, and whether the "
       "default model is ready. Every problem comes with a `fix:` line."),
    code("import sftkit\n\nsftkit.doctor()"),
    md("## 2. What will run where?\n\n"
       "sftkit picks the device and precision for you and says why. On a laptop without a GPU it "
       "trains LoRA adapters in fp32; where the CPU has native bf16 instructions (AVX512-BF16, AMX) the "
       "frozen weights are kept in bf16, about twice as fast, while the adapters and the loss stay fp32 "
       "(without those instructions bf16 is many times slower, so it is not used). On an NVIDIA GPU it "
       "uses QLoRA: 4-bit NF4 weights with bf16 compute."),
    code("print(sftkit.plan_load().describe())"),
    md("## 3. Load the model\n\n"
       "The first load converts the bundled GGUF file to a fast cache (about 40 s on a laptop CPU, "
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
    md("## Next\n\n**00_quickstart.ipynb** runs the whole loop in one notebook. The numbered notebooks "
       "then go deeper: a prompt template, the layers to train, attention, a fine-tune you can watch and stop, "
       "prompt vs fine-tune, feedback, and the PEFT families side by side."),
]
NOTEBOOKS = {"00_start_here.ipynb": cells}

NOTEBOOKS["00_quickstart.ipynb"] = [
    md("# Quickstart: the whole loop in one notebook\n\n"
       "The workshop's question, answered end to end: **does a small fine-tune beat a good prompt, and by how "
       "much?** The bundled model (SmolLM2-135M-Instruct, offline) learns the *dates* teaching task: any date "
       "in, `YYYY-MM-DD` out. Five steps, each with the widget the numbered notebooks explore in depth:\n\n"
       "1. the task and its prompt template, with the tokens that are trained (the loss mask);\n"
       "2. a layer plan: which weights get a LoRA adapter, and what that costs;\n"
       "3. a short training run with live curves and samples;\n"
       "4. what the fine-tune changed inside: base vs adapter attention on one prompt;\n"
       "5. the verdict: prompt vs fine-tune on the same fresh items, with a 95% confidence interval.\n\n"
       "Run the cells from top to bottom with **Shift+Enter** (or *Run > Run All Cells*)."),
    code("import sftkit\n"
         "from sftkit import split_rows\n"
         "from sftkit.ui import AttentionView, CompareView, LayerPicker, PromptBuilder, RunLauncher\n\n"
         "# workshop leaders: SFTKIT_NOTEBOOK_FAST=1 runs every notebook in minutes (3 steps, 8 items)\n"
         "config = sftkit.example_config()\n"
         'steps = sftkit.notebook_knob("steps", config.training.max_steps, fast=3)\n'
         'n_items = sftkit.notebook_knob("items", 60, fast=8)\n'
         'model, tokenizer = sftkit.load_model("default")\n'
         'task = sftkit.teaching_task("dates")\n'
         "print(task.description)"),
    md("## 1. The task, the template and the loss mask\n\n"
       "Fine-tuning trains the model to produce the **answer** tokens given everything before them. In the "
       "preview, **green** tokens are trained, **grey** ones are context only; the end-of-turn token "
       "`<|im_end|>` is trained too, so the model learns to stop. Edit the system prompt or the pattern and "
       "watch the mask follow; **Try it** shows what the base model answers now (notebook 1 goes deeper)."),
    code('train, held_out = split_rows(task.rows(), eval_size=100, seed=0)\n'
         "builder = PromptBuilder(train, tokenizer, model, task.template)\n"
         "builder"),
    md("## 2. What to train: a layer plan\n\n"
       "Each block of the model has attention and MLP projections. The plan here is the example run's: a "
       "rank-16 LoRA adapter beside every linear layer (green cells), everything else frozen. The counters "
       "say how many parameters train and how much memory the run needs; click cells to change the plan "
       "(notebook 2 goes deeper)."),
    code("anatomy = sftkit.inspect_model(model)\n"
         "picker = LayerPicker(model, sftkit.FreezePlan.from_adapter(config.adapter, anatomy), batch_size=8, seq_len=128)\n"
         "picker"),
    md("## 3. Train, and watch it learn\n\n"
       "The launcher runs `sftkit train` in a process of its own with the template from step 1 and the plan "
       "from step 2, and follows its run folder under `runs/`: the loss curve grows live, and every few steps "
       "the run answers a few held-out prompts (red turns green as it learns). **Stop** works at any time "
       "(notebook 4 goes deeper)."),
    code("config = config.with_changes(name=\"quickstart\", training={\n"
         '    "max_steps": steps, "eval_every": max(steps // 2, 1),\n'
         '    "checkpoint_every": max(steps // 2, 1), "sample_every": max(steps // 3, 1)})\n'
         "launcher = RunLauncher(config, template=builder.template, plan=picker.plan, anatomy=picker.anatomy)\n"
         "launcher.start()\n"
         "launcher"),
    md("The next cell waits for the run to end, so *Run All* works top to bottom."),
    code("print(launcher.wait())\n"
         "run = launcher.handle.run\n"
         'print(run.read_status()["message"])'),
    md("## 4. What changed inside? Base vs adapter attention\n\n"
       "The same held-out prompt through the base model (adapter off) and the fine-tuned one (adapter on). "
       "The grid colours each layer x head by how much its attention moved; the view opens the head that "
       "moved most. Click any cell to open another head (notebook 3 goes deeper)."),
    code("tuned, _ = sftkit.load_trained(run)\n"
         "split = sftkit.run_rows(run.config())\n"
         "row = split.eval[0]\n"
         "rendered = split.template.render(row, tokenizer)\n"
         "diff = sftkit.adapter_diff(tuned, tokenizer, input_ids=rendered.input_ids, segments=rendered.segments)\n"
         "change = diff.change()\n"
         "i, head = divmod(int(change.argmax()), change.shape[1])\n"
         "layer = diff.after.layers[i]\n"
         "print(f\"prompt: {row['text']!r} -> {row['iso']!r}; the head that moved most: layer {layer}, head {head}\")\n"
         "attention = AttentionView(diff)\n"
         "attention.select(layer, head)\n"
         "attention"),
    md("## 5. Did the fine-tune beat the prompt?\n\n"
       "Fresh items the run never trained on, answered three ways by one base model: the prompt alone "
       "(**zero-shot**), the prompt with three solved examples (**few-shot**), and the **fine-tune** (the "
       "adapter switched on). The items are the same for all three, so the comparison is paired: an exact "
       "McNemar test and a bootstrap 95% interval of the difference (notebook 5 goes deeper, with forgetting)."),
    code("seen = {r[\"text\"] for r in split.train}\n"
         "items = [r for r in task.rows(400, seed=12345) if r[\"text\"] not in seen][:n_items]\n"
         "variants = [sftkit.Variant.zero_shot(split.template, max_new_tokens=16),\n"
         '            sftkit.Variant.few_shot(split.template, split.train[:3], name="few-shot", items=items,\n'
         "                                    max_new_tokens=16),\n"
         '            sftkit.Variant.from_run(run, name="fine-tune", max_new_tokens=16)]\n'
         "view = CompareView(variants, items, model=model, tokenizer=tokenizer, scorer=task.score,\n"
         '                   cache=run.path / "compare", forgetting=False)\n'
         "view"),
    md("The answer to the workshop's question (the next cell waits for the comparison):"),
    code("view.wait()\n"
         "result = view.result\n"
         "summary = result.summary()\n"
         'print(f"{\'variant\':<12}{\'score\':>7}   95% CI (Wilson)   on {result.n} fresh items")\n'
         "for name in result.variants:\n"
         '    low, high = summary[name]["score_ci"]\n'
         '    print(f"{name:<12}{summary[name][\'score\']:>7.0%}   {low:.0%} to {high:.0%}")\n'
         "print()\n"
         'print(result.verdict("fine-tune", "few-shot"))\n'
         'print(result.verdict("fine-tune", "zero-shot"))'),
    md("## Reading the verdict\n\n"
       "- *better by N points (95% CI a to b)*: the fine-tune's score minus the prompt's, on the same items; "
       "the interval is where the true difference plausibly lies. An interval that excludes 0 (and a small "
       "p) means the gain is real, not luck of the items.\n"
       "- *no detectable difference*: with this many items a gap this size can't be told from chance; the "
       "verdict says about how many items it would take.\n"
       "- A prompt that is not detectably worse is often the better choice: nothing to train, nothing to "
       "forget.\n\n"
       "## Where next\n\n"
       "1 prompts and the loss mask, 2 layers and memory, 3 attention, 4 runs (stop, resume, export, merge), "
       "5 prompt vs fine-tune with forgetting, 6 feedback and DPO, 7 every PEFT family side by side."),
]

NOTEBOOKS["01_prompt_builder.ipynb"] = [
    md("# 1. Build the prompt, see what is trained\n\n"
       "Fine-tuning trains the model to produce the **answer** tokens of each example, given "
       "everything before them. Getting that *loss mask* wrong is the most common fine-tuning "
       "bug: train on nothing and the loss is meaningless; forget the end-of-turn token and the "
       "model never learns to stop. Here you build the prompt and watch the mask as you type."),
    code("import sftkit\n"
         "from sftkit import split_rows\n"
         "from sftkit.ui import PromptBuilder\n\n"
         'model, tokenizer = sftkit.load_model("default")'),
    md("## A teaching task\n\n"
       "sftkit ships tasks that a small model can't do from a prompt alone but learns quickly. "
       "`dates` rewrites any date as `YYYY-MM-DD`; `intent` turns a support message into a JSON "
       "label. The rows are generated from a seed, so everyone gets the same data offline."),
    code('task = sftkit.teaching_task("dates")\n'
         "print(task.description)\n"
         "train, held_out = split_rows(task.rows(), eval_size=100, seed=0)\n"
         "train[:3]"),
    md("## The builder\n\n"
       "Edit the system prompt and the user pattern (`{text}` is filled from each row). "
       "**Green** tokens are trained, **grey** ones are context only, outlined ones are special "
       "tokens. Pick a row, add it as a few-shot example, then press **Try it** to see what the "
       "base model answers; **Stop** ends it early. The notebook stays usable meanwhile."),
    code("builder = PromptBuilder(train, tokenizer, model, task.template)\nbuilder"),
    md("## The template as an object\n\n"
       "`builder.template` is what the next steps use. Saving it as YAML lets a run use it from "
       "the command line too."),
    code("template = builder.template\n"
         'template.save("templates/dates.yaml")\n'
         "example = template.render(train[0], tokenizer)\n"
         'trained = [t for t, m in zip(example.input_ids, example.loss_mask) if m]\n'
         'print(f"{example.n_tokens} tokens, {example.n_trained} trained: {tokenizer.decode(trained)!r}")'),
    code("report = template.validate(train, tokenizer)\n"
         'print(f"{report.n_rows} rows, longest {max(report.lengths)} tokens;", report.warnings or "no warnings")'),
    md("## The \"before\": how well does prompting alone do?\n\n"
       "Accuracy on held-out rows the model has never seen, zero-shot and with three examples, "
       "with a 95% confidence interval. This is the number fine-tuning has to beat."),
    code("from sftkit import score_prompting\n\n"
         "for few in (False, True):\n"
         "    tpl = task.template.with_examples(train[:3]) if few else task.template\n"
         "    print(score_prompting(model, tokenizer, tpl, held_out[:30], task.scorer, few_shot=few, max_new_tokens=16))"),
]

NOTEBOOKS["02_layer_picker.ipynb"] = [
    md("# 2. Choose what to train\n\n"
       "A model is a stack of identical **blocks**; each has **attention** projections (q, k, v, o) and "
       "**MLP** projections, plus norms. Fine-tuning does not have to touch all of them. Click cells to "
       "choose: green cells get a **LoRA** adapter, orange cells are trained in **full**. The counters "
       "show how many parameters train and how much memory the run will need."),
    code("import sftkit\n"
         "from sftkit.ui import LayerPicker\n\n"
         'model, tokenizer = sftkit.load_model("default")\n'
         "print(sftkit.inspect_model(model).describe())"),
    code("picker = LayerPicker(model, batch_size=8, seq_len=128)\npicker"),
    md("## The plan as an object\n\n"
       "`picker.plan` is a `FreezePlan`: sets of module and parameter names. It becomes a peft "
       "`LoraConfig` (or `requires_grad` flags for full training) when the run starts."),
    code("plan = picker.plan\n"
         "anatomy = picker.anatomy\n"
         "print(plan.label, plan.method, f\"{plan.trainable_params(anatomy):,} trainable\")\n"
         "if plan.method == 'lora':\n"
         "    lc = plan.lora_config(anatomy)  # the peft LoraConfig the run uses: print(lc) shows all its fields\n"
         "    targets = [lc.target_modules] if isinstance(lc.target_modules, str) else sorted(lc.target_modules)\n"
         "    more = f\" (+{len(targets) - 4} more)\" if len(targets) > 4 else \"\"\n"
         "    print(f\"LoraConfig: rank {lc.r}, alpha {lc.lora_alpha:g} \"\n"
         "          f\"(updates scaled by alpha/r = {lc.lora_alpha / lc.r:g}), \"\n"
         "          f\"dropout {lc.lora_dropout:g}\\n  on {', '.join(targets[:4])}{more} \"\n"
         "          f\"in blocks {lc.layers_to_transform or 'all'}\")\n"
         "else:\n"
         "    print('full training')"),
    md("## Presets side by side\n\n"
       "The same model, five ways to fine-tune it: trainable parameters and the estimated memory for "
       "batch 8 x 128 tokens in fp32 (weights + gradients + AdamW states + activations)."),
    code("from sftkit import FreezePlan\n\n"
         'print(f"{\'plan\':32} {\'trainable\':>12} {\'%\':>7} {\'memory\':>10}")\n'
         "for name, top in [('lora_attention', None), ('lora_all_linear', None), ('lora_top_blocks', 8),\n"
         "                  ('freeze_tuning', 4), ('bitfit', None)]:\n"
         "    p = FreezePlan.preset(name, anatomy, top_n=top)\n"
         "    n = p.trainable_params(anatomy)\n"
         "    est = p.memory_estimate(anatomy, batch_size=8, seq_len=128)\n"
         '    print(f"{p.label:32} {n:>12,} {100 * n / anatomy.total_params:>6.2f}% {est.total / 2**20:>7,.0f} MiB")'),
    md("## Does the estimate hold?\n\n"
       "Apply the plan to a fresh copy of the model, run one real training step and count the bytes."),
    code("from sftkit import measure_training_step\n\n"
         'fresh = sftkit.load_model("default").model\n'
         "est = plan.memory_estimate(anatomy, batch_size=2, seq_len=64)\n"
         "m = measure_training_step(plan.apply(fresh, anatomy), 2, 64)\n"
         'print(f"weights+grads+AdamW: estimated {est.weights_grads_optimizer / 2**20:.1f} MiB, '
         'measured {(m.weights + m.gradients + m.optimizer) / 2**20:.1f} MiB")\n'
         'print(f"activations: estimated {est.activations / 2**20:.1f} MiB, measured {m.activations / 2**20:.1f} MiB")'),
]

NOTEBOOKS["03_attention.ipynb"] = [
    md("# 3. Look inside: attention maps\n\n"
       "Each layer has several attention **heads**; each head decides, for every token, how much to look "
       "at every earlier token. The grid on the left colours every layer x head by a summary (how spread "
       "out it is, how much it looks at the first token or at the previous one, or at the parts of the "
       "prompt). Click a cell to open that head's map; the row plot shows what one token attends to."),
    code("import sftkit\n"
         "from sftkit import capture_row, adapter_diff\n"
         "from sftkit.ui import AttentionView\n\n"
         'model, tokenizer = sftkit.load_model("default")\n'
         'task = sftkit.teaching_task("dates")\n'
         "rows = task.rows()\n"
         "template = task.template.with_examples(rows[:2])\n"
         "capture = capture_row(model, tokenizer, template, rows[100])\n"
         'print(capture.n_tokens, "tokens,", capture.probs.shape[0], "layers x", capture.n_heads, "heads")'),
    code("view = AttentionView(capture)\nview"),
    md("Try *Colour by: answer*: which heads does the answer look at the question with? And *sink*: many "
       "heads park their attention on the first token when they have nothing better to do."),
    md("## What did fine-tuning change?\n\n"
       "A few steps of LoRA on the dates task (written out by hand here; the run launcher does this "
       "properly), then the same prompt through the base model (adapter off) and the adapter (on)."),
    code("import torch\n"
         "from sftkit import FreezePlan\n\n"
         "anatomy = sftkit.inspect_model(model)\n"
         'peft_model = FreezePlan.preset("lora_attention", anatomy, rank=8).apply(model, anatomy)\n'
         "opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)\n\n"
         "def batch(examples):\n"
         "    rendered = [task.template.render(r, tokenizer) for r in examples]\n"
         "    n = max(r.n_tokens for r in rendered)\n"
         "    pad = tokenizer.pad_token_id\n"
         "    ids = torch.tensor([r.input_ids + [pad] * (n - r.n_tokens) for r in rendered])\n"
         "    labels = torch.tensor([r.labels + [-100] * (n - r.n_tokens) for r in rendered])\n"
         "    mask = torch.tensor([[1] * r.n_tokens + [0] * (n - r.n_tokens) for r in rendered])\n"
         "    return dict(input_ids=ids, labels=labels, attention_mask=mask)\n\n"
         "peft_model.train()\n"
         "for step in range(12):\n"
         "    loss = peft_model(**batch(rows[200 + 4 * step: 204 + 4 * step]), use_cache=False).loss\n"
         "    loss.backward(); opt.step(); opt.zero_grad()\n"
         "    if step % 4 == 0 or step == 11:\n"
         '        print(f"step {step}: loss {loss.item():.3f}")'),
    code("rendered = template.render(rows[100], tokenizer)\n"
         "diff = adapter_diff(peft_model, tokenizer, input_ids=rendered.input_ids, segments=rendered.segments)\n"
         "change = diff.change()\n"
         "top = sorted(((change[l, h], l, h) for l in range(change.shape[0]) for h in range(change.shape[1])), reverse=True)[:5]\n"
         'print("heads that moved most (layer, head, change):", [(l, h, round(float(c), 4)) for c, l, h in top])\n'
         "diff_view = AttentionView(diff)\n"
         "diff_view"),
    md("## A static copy for the saved notebook\n\n"
       "Widgets need a running kernel; `snapshot()` leaves plain figures that stay in the saved file, and "
       "`export_html` writes one offline HTML file."),
    code("diff_view.snapshot()\n"
         'print(diff_view.export_html("exports/attention_diff.html"))'),
]

NOTEBOOKS["04_training.ipynb"] = [
    md("# 4. Train, watch, stop, resume\n\n"
       "A run is **one folder and one process**. The launcher starts `sftkit train` (the same command "
       "you can type in a terminal) in its own process and follows the run folder it writes: "
       "`config.yaml`, `metrics.jsonl`, `samples.jsonl`, `events.jsonl`, `checkpoints/` and, at the "
       "end, `adapter/`. So the kernel stays free while it trains, Stop works at any time, and closing "
       "the browser or restarting the kernel does not end the run: a new launcher reattaches to it."),
    md("## The config\n\n"
       "`sftkit.example_config()` is the bundled example: the default model learns the *dates* teaching "
       "task (any date format in, `YYYY-MM-DD` out), LoRA on every linear layer, 12 steps of 8 rows, "
       "about a minute on a laptop CPU. To use your own pieces, pass them in: "
       "`RunLauncher(config, template=builder.template, plan=picker.plan, anatomy=picker.anatomy, "
       "data=rows)`. The main knobs are editable in the widget; the accordion shows the whole config."),
    code("import sftkit\n"
         "from sftkit.ui import RunLauncher, RunHistory\n\n"
         "config = sftkit.example_config()\n"
         "# workshop leaders: SFTKIT_NOTEBOOK_FAST=1 (or SFTKIT_NOTEBOOK_STEPS=N) shortens the run\n"
         'steps = sftkit.notebook_knob("steps", config.training.max_steps, fast=3)\n'
         "config = config.with_changes(training={\n"
         '    "max_steps": steps, "eval_every": max(steps // 2, 1),\n'
         '    "checkpoint_every": max(steps // 2, 1), "sample_every": max(steps // 2, 1)})\n'
         "launcher = RunLauncher(config)\n"
         "launcher"),
    md("Click **Start** above (or run the next cell). Watch the loss fall in a few steps: the model "
       "already knows dates, it only has to learn the output format. The samples on the right are "
       "held-out rows the run answers every few steps: red turns green as it learns.\n\n"
       "Things to try: **Stop** mid-run (the adapter is saved at the next step), then **Resume** (it "
       "continues from the last checkpoint); raise the learning rate to 1e-2 and watch the curve; switch "
       "packing on and compare tokens/s."),
    code("launcher.start()"),
    md("The next cell waits for the run to end, so *Run All* works top to bottom. You don't need it: "
       "while the run trains, the kernel is free for anything else."),
    code("print(launcher.wait())\n"
         "print(launcher.handle.run.read_status()[\"message\"])"),
    md("## A static copy\n\n"
       "Widgets need a live kernel. `snapshot()` leaves the curves, a metrics table and the last samples "
       "as plain output, so the saved notebook still shows what happened."),
    code("launcher.snapshot()"),
    md("## Use the adapter\n\n"
       "`adapter/` is a plain peft adapter: `PeftModel.from_pretrained(base_model, run_folder / "
       "\"adapter\")` loads it anywhere. `sftkit.load_trained(run)` does exactly that with the run's "
       "base model. Here it answers held-out rows without any examples in the prompt."),
    code("from sftkit import answer_rows, run_rows\n\n"
         "run = launcher.handle.run\n"
         "tuned, tokenizer = sftkit.load_trained(run)\n"
         "held_out = run_rows(run.config()).eval[:8]\n"
         "template = run_rows(run.config()).template\n"
         "answers = answer_rows(tuned, tokenizer, template, held_out, few_shot=False, max_new_tokens=16)\n"
         "with tuned.disable_adapter():\n"
         "    base = answer_rows(tuned, tokenizer, template, held_out, few_shot=False, max_new_tokens=16)\n"
         "for row, b, a in zip(held_out, base, answers):\n"
         '    print(f"{row[\'text\']!r:32} base: {b.strip()[:30]!r:34} tuned: {a.strip()!r}")'),
    md("## One file for the command line\n\n"
       "The same run from a terminal, a GPU box, or several processes: export the YAML and run "
       "`sftkit train dates-lora.yaml`, or `accelerate launch --multi_gpu --num_processes 2 -m sftkit "
       "train dates-lora.yaml`. `sftkit runs` lists the run store; `sftkit stop RUN_FOLDER` stops one."),
    code('path = launcher.export_yaml("exports/dates-lora.yaml")\n'
         "print(path.read_text()[:400])"),
    md("## History\n\n"
       "Every run stays in the store (`runs/`). Pick runs to overlay their loss curves; with two "
       "selected, the table below shows which settings differ."),
    code('history = RunHistory("runs")\nhistory'),
    md("## A full model\n\n"
       "To ship a model that needs no peft, merge the adapter into the base weights (one call, "
       "safetensors out)."),
    code('merged = sftkit.merge_and_save(run, "exports/dates-merged")\n'
         "print(sorted(p.name for p in merged.iterdir()))"),
]

NOTEBOOKS["05_prompt_vs_finetune.ipynb"] = [
    md("# 5. Is a prompt enough, or do I need to fine-tune?\n\n"
       "The same held-out items, three ways: the base model with the prompt alone (**zero-shot**), the "
       "base model with a few solved examples in the prompt (**few-shot**), and the base model with the "
       "**adapter** a run trained. Because every variant answers the *same* items, the comparison is "
       "paired: an exact McNemar test on the items where they disagree, and a bootstrap interval of the "
       "difference. Then the other side of the bill: what the fine-tune cost elsewhere (forgetting). "
       "Its measured time is at the top."),
    md("## A fine-tuned run\n\n"
       "This reuses a finished *dates* run from notebook 4 if there is one in `runs/`; otherwise it "
       "trains the example config now (about a minute)."),
    code("import sftkit\n"
         "from sftkit.ui import CompareView\n\n"
         "def finished_dates_run(store):\n"
         "    for run in reversed(store.runs()):\n"
         '        if run.state() == "finished" and run.has_adapter() and run.config().data.source == "teaching:dates":\n'
         "            return run\n\n"
         'run = finished_dates_run(sftkit.RunStore("runs"))\n'
         "if run is None:\n"
         "    config = sftkit.example_config()\n"
         '    steps = sftkit.notebook_knob("steps", config.training.max_steps, fast=3)\n'
         '    config = config.with_changes(training={"max_steps": steps, "eval_every": 0, "sample_every": 0})\n'
         "    handle = sftkit.launch(config)\n"
         "    print(handle.wait())\n"
         "    run = handle.run\n"
         'print("run:", run.name)'),
    md("## The items and the variants\n\n"
       "Held-out items are fresh rows of the task that the run never trained on; the few-shot examples "
       "come from the run's *training* split (never from the items: sftkit refuses that). One base "
       "model is loaded once; the adapter is attached to it and switched on and off."),
    code("split = sftkit.run_rows(run.config())\n"
         'task = sftkit.teaching_task("dates")\n'
         "seen = {r[\"text\"] for r in split.train}\n"
         'n = sftkit.notebook_knob("items", 60, fast=8)\n'
         "items = [r for r in task.rows(400, seed=12345) if r[\"text\"] not in seen][:n]\n"
         "model, tokenizer = sftkit.load_model(run.config().model.spec)\n"
         "variants = [\n"
         "    sftkit.Variant.zero_shot(split.template),\n"
         '    sftkit.Variant.few_shot(split.template, split.train[:3], name="few-shot", items=items),\n'
         "    sftkit.Variant.from_run(run, name=\"adapter\"),\n"
         "]\n"
         "view = CompareView(variants, items, model=model, tokenizer=tokenizer, scorer=task.score,\n"
         '                   cache=run.path / "compare")\n'
         "view"),
    md("Generation runs in the background (the progress bar and ETA above; **Stop** keeps what is done). "
       "When it ends you get a chart per metric family with 95% intervals, the paired table with a "
       "verdict per pair, the forgetting check, and every item side by side: filter to the *flips* "
       "(items where the variants disagree) to see what the fine-tune changed. The next cell waits, so "
       "*Run All* works."),
    code("view.wait()\n"
         "result = view.result\n"
         'for other in ("zero-shot", "few-shot"):\n'
         '    print(result.verdict("adapter", other))\n'
         'print(result.verdict("few-shot", "zero-shot"))\n'
         'f = result.forgetting.get("adapter")  # none when the comparison was stopped\n'
         "if f:\n"
         "    print(f\"forgetting: general-text perplexity {f['general_ppl_base']:.2f} -> {f['general_ppl_adapter']:.2f}, \"\n"
         "          f\"KL(base || adapter) {f['kl']:.4f} per token\")"),
    md("## When is a prompt enough?\n\n"
       "- If **few-shot** is not detectably worse than the adapter (the verdict says *no detectable "
       "difference*, and the interval is narrow enough to rule out a gap you care about), keep the "
       "prompt: nothing to train, nothing to forget, any base model update for free.\n"
       "- If the adapter is better with an interval that excludes zero and a small McNemar p, the "
       "fine-tune earns its place; check the cost elsewhere: a general-text perplexity that rose a lot "
       "or a large KL means it changed the model beyond the task.\n"
       "- *No detectable difference* on few items is not *no difference*: the verdict says about how "
       "many items it would take to see one of the size observed."),
    md("## Keep the result\n\n"
       "`snapshot()` leaves the charts and tables in the saved notebook; the per-item results are cached "
       "in the run folder, so running this notebook again shows them without generating again."),
    code("view.snapshot()\n"
         'print(view.export_html("exports/prompt-vs-finetune.html"))'),
]

NOTEBOOKS["06_feedback.ipynb"] = [
    md("# 6. Feedback: rate the answers, train on the preferences, check on held-out items\n\n"
       "After supervised fine-tuning comes tuning from feedback: people compare or rate the model's answers, "
       "and the model is trained toward the preferred ones. Here the *dates* adapter from notebook 4 answers "
       "fresh prompts; the task's scorer labels a few hundred answer pairs in a minute (a correct date beats a "
       "wrong one) and you rate some by hand; **DPO** (direct preference optimisation, through TRL) then "
       "trains the adapter further, with the SFT adapter itself as the frozen reference. Last, the honest "
       "check: prompts no one rated, the SFT adapter against the DPO one, with paired statistics. "
       "Its measured time is at the top."),
    md("## The SFT adapter\n\n"
       "This reuses a finished *dates* run from notebook 4 if `runs/` has one; otherwise it trains the "
       "example config now (about a minute)."),
    code("import sftkit\n"
         "from sftkit.ui import CompareView, FeedbackCollector, RunLauncher\n\n"
         "def finished_dates_run(store):\n"
         "    for run in reversed(store.runs()):\n"
         "        cfg = run.config()\n"
         '        if run.state() == "finished" and run.has_adapter() and cfg.objective == "sft" \\\n'
         '                and cfg.data.source == "teaching:dates":\n'
         "            return run\n\n"
         'sft_run = finished_dates_run(sftkit.RunStore("runs"))\n'
         "if sft_run is None:\n"
         "    config = sftkit.example_config()\n"
         '    steps = sftkit.notebook_knob("steps", config.training.max_steps, fast=3)\n'
         '    config = config.with_changes(training={"max_steps": steps, "eval_every": 0, "sample_every": 0})\n'
         "    handle = sftkit.launch(config)\n"
         "    print(handle.wait())\n"
         "    sft_run = handle.run\n"
         'print("SFT run:", sft_run.name)'),
    md("## Rate the answers\n\n"
       "The collector samples two answers per prompt from the adapter (temperature and top-p are in the "
       "widget) through the run's own template. Say which is better (**A better** / **B better**, or keys "
       "`1`/`2` after clicking the key box), **Tie**, **Both bad**, thumbs up/down per answer, or write the "
       "right answer yourself (it becomes the chosen one). **Undo** takes the last rating back. Every rating "
       "is appended to `runs/feedback/dates/ratings.jsonl` the moment you make it: restart the kernel and "
       "the collector goes on where you stopped. The prompts are fresh: none is in the run's training rows."),
    code('task = sftkit.teaching_task("dates")\n'
         "split = sftkit.run_rows(sft_run.config())\n"
         'seen = {r["text"] for r in split.train}\n'
         'fresh = [r for r in task.rows(2000, seed=606) if r["text"] not in seen]\n'
         'n_prompts = sftkit.notebook_knob("prompts", 160, fast=24)\n'
         'n_items = sftkit.notebook_knob("items", 60, fast=8)\n'
         "prompts, items = fresh[:n_prompts], fresh[n_prompts:n_prompts + n_items]  # items: never rated\n"
         "model, tokenizer = sftkit.load_trained(sft_run)\n"
         "collector = FeedbackCollector(model, tokenizer, split.template, prompts, store=\"runs\", name=\"dates\",\n"
         "                              k=2, temperature=1.0, max_new_tokens=12, model_label=sft_run.name,\n"
         "                              scorer=task.score)\n"
         "collector"),
    md("## Labels from the scorer\n\n"
       "**Label with the scorer** (or the next cell) samples four answers for each remaining prompt and pairs "
       "every correct one with every wrong one; each pair keeps its source (`scorer` or `person`). Prompts "
       "where all four are right (or all wrong) give no pair."),
    code("collector.session.stop()  # the prompt on screen stays yours to rate\n"
         "collector.session.wait()\n"
         "collector.session.set_sampling(k=4)\n"
         "collector.session.autolabel(max(collector.session.remaining - 5, 1), batch_size=16)\n"
         "collector.wait()\n"
         "collector.session.set_sampling(k=2)\n"
         "collector.session.start()\n"
         "print(collector.session.counts())"),
    md("A few by hand: rate the prompts left in the widget above. For *Run All*, the next cell types the "
       "correct date for three of them into the answer box, as you would."),
    code("for _ in range(3):\n"
         "    item = collector.wait_ready()\n"
         "    if item is None:\n"
         "        break\n"
         '    collector.edit_box.value = item.row["iso"]\n'
         "    collector.edit_button.click()\n"
         "counts = collector.session.counts()\n"
         "print(f\"{counts['pairs']} pairs: {counts['by_person']} by hand, {counts['by_scorer']} by the scorer\")\n"
         "for warning in collector.session.warnings():\n"
         '    print("warning:", warning)'),
    md("## Train DPO from the SFT adapter\n\n"
       "The pairs become a data file like any other (the template's input field `text` plus `chosen` and "
       "`rejected`). `objective: dpo` runs TRL's DPOTrainer in the same one-run-one-process launcher, with "
       "Stop, checkpoints and curves; `adapter.init_from` starts from the SFT adapter and keeps a frozen copy "
       "of it as the reference (no second model in memory). A quarter of the prompts are held out: their "
       "pairs are never trained on. The last panel of the curves shows the preference accuracy (the share "
       "of pairs whose chosen answer gained more than the rejected one) on training and held-out pairs."),
    code('data = collector.session.store.save_rows("exports/dates-pairs.jsonl", "dpo")\n'
         'steps = sftkit.notebook_knob("steps", 16, fast=3)\n'
         "config = sftkit.RunConfig.from_dict({\n"
         '    "name": "dates-dpo", "store": "runs", "objective": "dpo", "model": {"spec": "default"},\n'
         '    "data": {"source": str(data), "eval_fraction": 0.25, "max_eval_rows": 200, "sample_prompts": 2},\n'
         '    "adapter": {"init_from": str(sft_run.path)},\n'
         '    "preference": {"beta": 0.1, "sft_weight": 1.0},\n'
         '    "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-4, "lr_schedule": "constant",\n'
         '                 "warmup": 0, "eval_every": max(steps // 2, 1), "checkpoint_every": steps,\n'
         '                 "sample_every": 0, "sample_max_new_tokens": 12}})\n'
         "launcher = RunLauncher(config)\n"
         "launcher"),
    code("launcher.start()\n"
         "print(launcher.wait())\n"
         "dpo_run = launcher.handle.run\n"
         'print(dpo_run.read_status()["message"])\n'
         'held = [m for m in dpo_run.metrics() if "eval_rewards/accuracies" in m]\n'
         "if held:\n"
         "    print(f\"held-out preference accuracy: {held[-1]['eval_rewards/accuracies']:.0%} \"\n"
         "          f\"(margin {held[-1]['eval_rewards/margins']:.3f})\")\n"
         "for e in dpo_run.events():\n"
         '    if e["event"] == "warning":\n'
         '        print("warning:", e["message"])\n'
         "launcher.snapshot()"),
    md("## Did it help on prompts nobody rated?\n\n"
       "The SFT adapter and the DPO adapter answer the same fresh items, greedy, on one base model. The "
       "verdict is paired (exact McNemar on the items where they disagree, a bootstrap interval of the "
       "difference). Preference tuning should not cost task accuracy; if the interval says it did, lower the "
       "learning rate or raise `preference.beta`. `preference.sft_weight` (1.0, the default) adds the answer "
       "loss on the chosen answers: pure DPO (0) only asks the chosen answer to gain *relative* to the rejected "
       "one, and can push both down until the model stops writing dates. Measured on this CPU (default model, "
       "144 scorer pairs, 10 steps): pure DPO at learning rate 5e-4 took the task score from 85% to 7%; with "
       "`sft_weight` 1.0 at 1e-4 it stayed at 87% (no detectable difference, 60 items)."),
    code("base, base_tokenizer = sftkit.load_model(sft_run.config().model.spec)\n"
         'variants = [sftkit.Variant.from_run(sft_run, name="sft", max_new_tokens=12),\n'
         '            sftkit.Variant.from_run(dpo_run, name="dpo", max_new_tokens=12)]\n'
         "view = CompareView(variants, items, model=base, tokenizer=base_tokenizer, scorer=task.score,\n"
         '                   cache=dpo_run.path / "compare", forgetting=False)\n'
         "view.wait()\n"
         'print(view.result.verdict("dpo", "sft"))\n'
         "view"),
    md("## Take the data elsewhere\n\n"
       "The pairs in TRL's standard conversational format (prompt / chosen / rejected), loadable by "
       "`datasets`; the DPO adapter is a plain peft adapter like any other run's."),
    code('path = collector.session.store.export_trl("exports/dates-pairs.parquet", "dpo")\n'
         "from datasets import load_dataset\n\n"
         'pairs = load_dataset("parquet", data_files=str(path), split="train")\n'
         "print(pairs)\n"
         "print(pairs[0])"),
]



NOTEBOOKS["07_peft_methods.ipynb"] = [
    md("# 7. Every PEFT family side by side\n\n"
       "Parameter-efficient fine-tuning freezes the pretrained weights and trains a small part. The course's four "
       "families: **adapters** (here IA3's scaling vectors and LLaMA-Adapter's gated prompts, peft's adapter-style "
       "methods), **prompt tuning** (a soft prompt in front of every input; prefix tuning puts it in front of every "
       "block's attention), **LoRA** (a low-rank update beside each weight; DoRA learns its magnitude too) and "
       "**BitFit** (only the biases and norms). This notebook trains each on the same task with the same rows, "
       "steps and seed, and reads the table: what each trains, what it costs, how well it does. Its measured "
       "time is at the top; the shoot-out is most of it (a few minutes with `SFTKIT_NOTEBOOK_FAST=1`)."),
    md("## What each method trains\n\n"
       "Every method is a run-config preset (`adapter.preset`) with its own knobs (`virtual_tokens`, `use_dora`, "
       "`rslora`, `prompt_init`, ...). The counts are exact: a run refuses to start if the parameters with "
       "`requires_grad` differ from them. The memory estimate is per method (a soft prompt makes every row longer; "
       "DoRA keeps more for backward)."),
    code("import sftkit\n"
         "from sftkit.ui import ShootoutView\n\n"
         'model, tokenizer = sftkit.load_model("default")\n'
         "anatomy = sftkit.inspect_model(model)\n"
         'print(f"{\'method\':<16}{\'preset\':<17}{\'trainable\':>12}{\'of the model\':>14}{\'estimated peak\':>16}")\n'
         "for method in sftkit.PEFT_METHODS.values():\n"
         "    config = sftkit.RunConfig.from_dict({\"adapter\": method.adapter})\n"
         "    plan = sftkit.FreezePlan.from_adapter(config.adapter, anatomy)\n"
         "    n = plan.trainable_params(anatomy)\n"
         "    peak = plan.memory_estimate(anatomy, batch_size=8, seq_len=64).total\n"
         '    print(f"{method.name:<16}{method.adapter[\'preset\']:<17}{n:>12,}{100 * n / anatomy.total_params:>13.3f}%"\n'
         '          f"{peak / 2**20:>12,.0f} MiB")'),
    md("A soft prompt of 20 virtual tokens is 20 x 576 = 11,520 numbers: under 0.01% of the model. LoRA of rank 8 on "
       "the attention projections is 921,600 (0.685%), DoRA adds a magnitude per output (967,680, 0.719%), IA3 "
       "scales keys, values and the MLP inputs (57,600, 0.043%); BitFit trains the norms and biases (this model has "
       "no biases: 35,136, 0.026%). The last three rows are variants the shoot-out trains only when named: rsLoRA "
       "has LoRA's count (it changes only the scaling, alpha/sqrt(rank) instead of alpha/rank), p-tuning's soft "
       "prompt comes out of a small trained MLP (1,008,576, 0.750%: the MLP is most of it), and freeze tuning "
       "trains the last two blocks in full (7,080,192, 5.263%)."),
    md("## The shoot-out\n\n"
       "`compare_methods` (and this view over it) trains each method as an ordinary run, one after the other, in "
       "`runs/` (so **RunHistory** lists them, each with its curves, adapter and config), with the same step budget "
       "and seed. Each family gets its usual learning rate (a soft prompt needs a far larger step than LoRA). Then "
       "one comparison scores every run on the same held-out items: the task score with a 95% interval, the paired "
       "test against the best method, and forgetting (how far each moved from the base model on general text). "
       "**Stop** ends the run in progress and starts no other."),
    code("# workshop leaders: SFTKIT_NOTEBOOK_FAST=1 trains one method a family for 3 steps and scores 8 items\n"
         'steps = sftkit.notebook_knob("steps", 60, fast=3)\n'
         'items = sftkit.notebook_knob("items", 40, fast=8)\n'
         'chosen = sftkit.notebook_knob("methods", ",".join(sftkit.DEFAULT_PEFT_METHODS), fast="LoRA,IA3,prompt tuning,BitFit")\n'
         'methods = [name.strip() for name in chosen.split(",")]\n'
         "budget = sftkit.Budget(steps=steps, batch_size=8, rows=400, eval_items=items, seed=0)\n"
         'view = ShootoutView(task="dates", methods=methods, budget=budget, store="runs")\n'
         "view.start()\n"
         "view"),
    md("The curves fill in as each method trains. The next cell waits for the table, so *Run All* works."),
    code("view.session.wait()\n"
         "result = view.session.result\n"
         "print(result.text())\n"
         'print("best:", result.best, "| zero-shot base model:", result.zero_shot)'),
    md("## Reading the table\n\n"
       "- **When a few thousand parameters are enough.** A soft prompt only steers a model that can already do "
       "the task: it adds context, it cannot add a skill. When the base model gets part of the items right "
       "(zero-shot above), prompt tuning can close much of the gap for almost nothing: no weights change, one "
       "base model serves every task, nothing to forget (its KL is the change the prompt makes, not damage).\n"
       "- **When they are not.** When the task needs a new mapping (a date format the model never writes, "
       "labels it never uses), the methods that change the computation inside every block (LoRA, DoRA, IA3) "
       "learn it in the same steps where a soft prompt stalls: compare the eval losses and the scores' "
       "intervals. Prompt methods also learn slowly per step, so a small step budget favours LoRA.\n"
       "- **Read the intervals, not the ranking.** *vs the best* is a paired test on the same items, its p "
       "Holm-adjusted over every method compared with the best; and the best was chosen on these same items, so "
       "its lead is a little optimistic. *No detectable difference* with a wide interval means: more items, or "
       "more steps.\n"
       "- **Cost.** Peak memory is the run process's (the model itself dominates at this size); tokens/s shows "
       "the extra work: a soft prompt makes every row longer, DoRA recomputes its weight norm each step."),
    md("## Where the soft prompt's attention goes\n\n"
       "The prompt-tuning run's 20 virtual tokens are trained vectors in front of every prompt, not text. The "
       "attention capture puts them first (`<v0>` ... `<v19>`), and `virtual_share()` says, per layer and head, "
       "how much of the real tokens' attention they take: the soft prompt steers the model only through that "
       "share. In the view, colour the grid by *virtual*. (The template preview draws the same positions: "
       "`PromptBuilder(..., method=\"prompt_tuning\")`.)"),
    code("from sftkit.ui import AttentionView\n\n"
         'soft = next((sftkit.RunStore("runs").get(row["run"]) for row in result.methods\n'
         '             if row["method"] == "prompt tuning" and row.get("state") == "finished"), None)\n'
         "if soft is None:\n"
         '    print("no finished prompt-tuning run in this shoot-out: add \\"prompt tuning\\" to its methods")\n'
         "else:\n"
         "    tuned, tokenizer = sftkit.load_trained(soft)\n"
         "    split = sftkit.run_rows(soft.config())\n"
         "    rendered = split.template.render(split.eval[0], tokenizer)\n"
         "    capture = sftkit.capture_attention(tuned, tokenizer, input_ids=rendered.input_ids,\n"
         '                                       segments=rendered.segments, label="prompt tuning")\n'
         "    share = capture.virtual_share()\n"
         '    print(f"{capture.n_virtual} virtual tokens in front of {capture.n_real} real tokens: they get "\n'
         '          f"{share.mean():.1%} of the real tokens\' attention (heads from {share.min():.1%} to {share.max():.1%})")\n'
         '    print("per layer, mean of heads:", " ".join(f"{v:.0%}" for v in share.mean(axis=1)))\n'
         "    soft_view = AttentionView(capture)\n"
         '    soft_view.summary.value = "virtual"\n'
         "    display(soft_view)"),
    md("## Export: merge what can merge\n\n"
       "LoRA, DoRA and IA3 change weights, so they merge into a plain model. A soft prompt or a prefix is not a "
       "change of weights: merging it is refused with the reason, and the adapter is exported as it is (plain "
       "`peft.PeftModel.from_pretrained` loads it)."),
    code("runs = {row[\"method\"]: sftkit.RunStore(\"runs\").get(row[\"run\"]) for row in result.methods}\n"
         "try:\n"
         '    sftkit.merge_and_save(runs["prompt tuning"], "exports/prompt-merged")\n'
         "except sftkit.SftkitError as exc:\n"
         '    print("refused:", exc)\n'
         'print("exported:", sftkit.export_adapter(runs["prompt tuning"], "exports/prompt-adapter"))\n'
         'print("merged:", sftkit.merge_and_save(runs["IA3"], "exports/ia3-merged"))'),
    md("## After a restart\n\n"
       "The table is saved in the run store beside the runs: this shows the latest shoot-out again, and "
       "`snapshot()` leaves it in the saved notebook as static output."),
    code('ShootoutView.reopen("runs").snapshot()'),
]


# ---- the header every notebook starts with: what you will learn, and its measured time ----------------
LEARN = {
    "00_start_here.ipynb": "whether this laptop is ready (libraries, CPU/GPU, memory, the bundled model), what "
                           "sftkit will run where and why, and how a chat model's prompt format looks.",
    "00_quickstart.ipynb": "the whole fine-tuning loop once: the loss mask, a layer plan, a run you watch, what "
                           "changed inside the model, and whether the fine-tune beat the prompt (with a 95% interval).",
    "01_prompt_builder.ipynb": "how a training example becomes tokens, which of them are trained (the loss mask), "
                               "and how well prompting alone does: the number a fine-tune has to beat.",
    "02_layer_picker.ipynb": "what a transformer block is made of, what LoRA / full / freeze plans train, and how "
                             "many parameters and how much memory each costs (estimated, then measured).",
    "03_attention.ipynb": "how to read attention maps (heads, sinks, previous-token heads) and which heads a "
                          "short fine-tune changed.",
    "04_training.ipynb": "how a run works (one folder, one process): start, watch, stop, resume, use the adapter, "
                         "export the YAML, compare runs, merge.",
    "05_prompt_vs_finetune.ipynb": "how to decide between a prompt and a fine-tune: paired statistics on the same "
                                   "items, verdicts with intervals, and what the fine-tune cost elsewhere.",
    "06_feedback.ipynb": "how ratings become preference pairs, how DPO trains from them, and how to check the "
                         "result honestly on prompts nobody rated.",
    "07_peft_methods.ipynb": "what each PEFT family (adapters, soft prompts, LoRA, BitFit) trains and costs, and how "
                             "they compare on one task with one budget.",
}
TIMINGS = Path(__file__).resolve().with_name("timings.json")  # written by lab/time_notebooks.py, never by hand


def measured_time(name: str, timings: dict, device: str) -> str:
    """The measured full-profile time of ``name`` on ``device`` in words, or "not measured"."""
    t = timings.get("notebooks", {}).get(name, {}).get(device)
    if not t:
        return "not measured"
    return f"{t['seconds'] / 60:.1f} min (measured {t['date']} on {t['machine']})"


def header(name: str, timings: dict) -> str:
    return (f"**What you will learn:** {LEARN[name]}\n\n"
            f"**Time, top to bottom:** CPU: {measured_time(name, timings, 'cpu')}; "
            f"GPU: {measured_time(name, timings, 'gpu')}. "
            "(`python lab/time_notebooks.py` measures it; the teacher's kit is `lab/README.md`.)")


def load_timings() -> dict:
    import json

    return json.loads(TIMINGS.read_text()) if TIMINGS.is_file() else {}


OUT_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def build() -> dict:
    """The notebooks, in memory: file name -> nbformat notebook (what ``main`` writes)."""
    notebooks = {}
    timings = load_timings()
    for name, nb_cells in NOTEBOOKS.items():
        nb_cells = copy.deepcopy(nb_cells)
        nb_cells[0].source += "\n\n" + header(name, timings)  # in the title cell: no cell moves
        for i, cell in enumerate(nb_cells):
            cell.id = f"{Path(name).stem[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
        nb = nbf.v4.new_notebook(cells=nb_cells)
        nb.metadata["kernelspec"] = {"name": "sftkit", "display_name": "sftkit (Python 3)", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        notebooks[name] = nb
    return notebooks


def main(out_dir: Path = OUT_DIR) -> None:
    for name, nb in build().items():
        nbf.write(nb, str(out_dir / name))
        print("wrote", out_dir / name)


if __name__ == "__main__":
    main()
