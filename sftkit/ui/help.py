"""Inline help: one line per control, shown as its tooltip, saying what it changes and the usual range.

Each view calls ``add_tips(self)`` once its controls exist. Controls made later (one per example,
item or candidate) set their tooltip where they are made; the run launcher's knobs take theirs from
the config fields' own help (``knob_spec``). The layer picker also has its longer "What do these
choices mean?" block.
"""

from __future__ import annotations

TIPS: dict[str, dict[str, str]] = {
    "PromptBuilder": {
        "system": "The system prompt: standing instructions before every example. Empty: the chat template's "
                  "default. A sentence or two is usual.",
        "pattern": "The user turn; {column} is filled from each row (e.g. {text}). Only this and the answer "
                   "change between examples.",
        "answer_field": "The column the model learns to write: its tokens (and the end-of-turn) are trained.",
        "train_on": "completion: train only the answer (usual); all: every token, the prompt too (rarely better).",
        "max_length": "Longest example in tokens; longer rows are cut and their end is not trained. 128-2048 is "
                      "usual; memory grows with it.",
        "row": "Which data row the preview shows.",
        "mode": "What the preview shows: the training example (with the answer) or the prompt generation sees.",
        "add_row_button": "Put this row into the prompt as a solved example (few-shot). 0-5 examples is usual.",
        "add_blank_button": "Add an empty example to fill in by hand.",
        "check_button": "Render every row and list the problems: too long, nothing trained, a missing field.",
        "try_button": "Ask the base model this row's prompt now (greedy), and compare with the dataset's answer.",
        "stop_button": "End the answer being generated.",
    },
    "LayerPicker": {
        "preset": "A starting plan: LoRA on attention (classic), all linear layers (learns more), top blocks, "
                  "freeze tuning, BitFit, IA3 or a prompt method. Apply it with the button.",
        "top_n": "For the top-blocks presets: how many of the last blocks train (a quarter to a half is usual).",
        "apply_preset_button": "Replace the plan with the chosen preset (your cell clicks are dropped).",
        "click_sets": "What a click on a frozen cell gives it: a LoRA adapter, or full training of its weights.",
        "rank": "LoRA rank r: the size of each adapter's matrices. 8-16 is usual; 64+ learns more and costs more.",
        "alpha": "LoRA alpha: the update is scaled by alpha / r. Usually r or 2r.",
        "dropout": "Dropout on the adapters' input while training: 0-0.1 is usual; more regularises small data.",
        "use_dora": "DoRA: LoRA plus a learned magnitude per output; often a little better, a little slower.",
        "rslora": "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r; keeps high ranks (64+) stable.",
        "batch_size": "Rows per step for the memory estimate (4-32 usual); more rows, more activation memory.",
        "seq_len": "Tokens per row for the memory estimate: your longest examples (128-2048 usual).",
        "checkpointing": "Gradient checkpointing: recompute activations in backward; saves most of their memory "
                         "for about 30% more time.",
    },
    "AttentionView": {
        "summary": "What colours the grid: how much each head moved (change), how spread out it looks (entropy), "
                   "how much it looks at the first token (sink), the previous token, or a part of the prompt.",
        "layer": "The layer the heatmap shows (0 = nearest the input). A grid click sets it too.",
        "head": "The head the heatmap shows, or the mean / max over the layer's heads.",
        "window_start": "First token of the window the heatmap shows (long prompts: slide through them).",
        "window_size": "How many tokens the heatmap shows (at most 256 at once).",
        "query": "The row plot's token: what this token attends to, over the window's tokens.",
    },
    "RunLauncher": {
        "start_button": "Start a run with these settings in its own process (a new folder under the run store).",
        "stop_button": "Ask the run to stop: it saves a checkpoint and the adapter at the next step.",
        "resume_button": "Continue a stopped or interrupted run from its last complete checkpoint.",
        "export_button": "Write this config as YAML, for `sftkit train FILE` in a terminal or on a GPU box.",
    },
    "RunHistory": {
        "picker": "Runs to overlay (Ctrl/Shift-click for several); with two selected the table shows what differs.",
        "reload_button": "Read the run store again (new runs, runs that finished meanwhile).",
    },
    "CompareView": {
        "stop_button": "Stop generating; the items already answered are kept, compared and cached.",
        "csv_button": "Every item with every variant's output and metrics, as CSV.",
        "html_button": "The charts and tables as one offline HTML file.",
        "filter": "Which items the table lists: all, flips (A and B disagree), wins / losses of A over B, "
                  "errors (some variant wrong).",
        "a": "Variant A of the item table's wins / losses filter (usually the adapter).",
        "b": "Variant B: what A is compared with (usually zero-shot or few-shot).",
        "page": "Page of the item table.",
    },
    "FeedbackCollector": {
        "k": "Answers sampled per prompt: 2 for A/B (quickest to rate), up to 4 to rank by clicking.",
        "temperature": "Sampling temperature of the candidates: 0.7-1.0 is usual; higher gives more varied answers.",
        "top_p": "Nucleus sampling: keep the most likely tokens up to this probability mass (0.9-1.0 usual).",
        "stop_button": "Stop sampling candidates; the ratings made are kept.",
        "a_button": "A is better than B (key 1).",
        "b_button": "B is better than A (key 2).",
        "tie_button": "Both are as good: recorded as a tie (DPO trains on pairs, so a tie gives none).",
        "bad_button": "Both are wrong: no chosen answer (write the right one below to make a pair).",
        "skip_button": "Next prompt without rating this one.",
        "undo_button": "Take the last rating back; its prompt comes again with the same answers.",
        "edit_box": "The right answer in your words: it becomes the chosen answer against the candidates.",
        "edit_button": "Use the answer written above as the chosen one.",
        "auto_n": "How many prompts the scorer labels (each correct answer beats each wrong one); 100-500 usual.",
    },
    "ShootoutView": {
        "start_button": "Train every PEFT method one after the other with the same rows, steps and seed, then "
                        "score them all on the same items.",
        "stop_button": "The method in training stops at its next step (its adapter is kept); no other starts.",
    },
}


def add_tips(view, tips: dict[str, str] | None = None) -> None:
    """Give each of ``view``'s controls its line of help (a tooltip it already has is kept)."""
    for attr, text in (tips if tips is not None else TIPS.get(type(view).__name__, {})).items():
        widget = getattr(view, attr, None)
        if widget is not None and hasattr(widget, "tooltip") and not widget.tooltip:
            widget.tooltip = text
