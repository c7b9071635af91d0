"""Upload a finished run's export to the Hugging Face Hub (``export.push_to_hub: user/name``), with a model card.

The repository gets the export at its root, so it loads the way the export does from the run directory:
``pipe.load_lora_weights("user/name")`` (a diffusers LoRA), ``<Transformer>.from_pretrained("user/name")`` (a full
flow fine-tune), ``PeftModel.from_pretrained(base, "user/name")`` / ``AutoModelForCausalLM.from_pretrained`` (LLM).
The card (``README.md``) holds the report's before/after table and checks and its first and last sample grids.
Everything is staged under ``<run>/hub/`` first, so what was sent can be read afterwards.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

# what a task's export writes, in the order looked for
EXPORTS = ("lora", "transformer", "model")


def find_export(out_dir: Path) -> Path:
    """The export of the run in ``out_dir``: ``lora/``, ``transformer/``, ``model/`` or ``model.safetensors``."""
    for name in EXPORTS:
        if (out_dir / name).is_dir():
            return out_dir / name
    if (out_dir / "model.safetensors").is_file():
        return out_dir / "model.safetensors"
    raise FileNotFoundError(f"{out_dir} holds no export ({', '.join(n + '/' for n in EXPORTS)} or model.safetensors)")


def base_model(cfg: Any) -> Optional[str]:
    """The hub id the run started from (None for a local folder or an embedded model)."""
    from flowrl.train.algorithms import ALGORITHMS

    family = getattr(ALGORITHMS[cfg.algorithm], "family", "flow")
    name = cfg.llm.model if family == "llm" else cfg.flow.model_path
    if not name or os.path.exists(str(name)) or str(name).count("/") != 1:
        return None
    return str(name)


def model_card(cfg: Any, out_dir: Path, export: Path, images: list[str]) -> str:
    """The card's markdown: front matter (library, base model, tags), how to load it, the report's table and checks
    (``report.md`` without its own samples and curves), and the before/after grids."""
    lora = export.name == "lora"
    library = "peft" if lora and (export / "adapter_config.json").is_file() else (
        "transformers" if export.name == "model" else "diffusers")
    base = base_model(cfg)
    front = ["---", f"library_name: {library}", "tags:", "- flowrl", f"- {cfg.algorithm}"] + (["- lora"] if lora else [])
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    repo = cfg.export.push_to_hub
    how = {"diffusers": (f"pipe.load_lora_weights(\"{repo}\")" if lora else
                         f"transformer = <TransformerClass>.from_pretrained(\"{repo}\"); "
                         f"pipe = <PipelineClass>.from_pretrained(\"{base or '<base model>'}\", transformer=transformer)"),
           "peft": f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base or '<base model>'}\"), "
                   f"\"{repo}\")",
           "transformers": f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")"}[library]
    lines = front + ["", f"# {repo}", "", f"Trained with flowrl, algorithm `{cfg.algorithm}`"
                     + (f", from `{base}`" if base else "") + ".", "", "```python", how, "```", ""]
    report = out_dir / "report.md"
    if report.is_file():
        text = report.read_text()
        for cut in ("## Samples", "## Curves", "## Completions"):
            text = text.split(cut)[0]
        body = text.splitlines()[1:]  # the report's title names the run directory
        lines += ["## Evaluation (before and after training)", ""] + body
    if images:
        lines += ["## Samples (fixed prompts and seeds)", "", f"Before: ![before]({images[0]})", ""]
        if len(images) > 1:
            lines += [f"After: ![after]({images[-1]})", ""]
    return "\n".join(lines).rstrip() + "\n"


def stage(cfg: Any, out_dir: str | Path) -> Path:
    """``<out_dir>/hub/``: the export's files at the root, ``README.md`` (the card) and the first and last sample
    grids under ``samples/``. Returns the folder."""
    out_dir = Path(out_dir)
    export = find_export(out_dir)
    hub = out_dir / "hub"
    if hub.exists():
        shutil.rmtree(hub)
    if export.is_dir():
        shutil.copytree(export, hub)
    else:
        hub.mkdir()
        shutil.copy2(export, hub / export.name)
    grids = sorted(out_dir.glob("samples/step_*.png"))
    images = []
    for g in (grids[:1] + grids[-1:] if len(grids) > 1 else grids):
        (hub / "samples").mkdir(exist_ok=True)
        shutil.copy2(g, hub / "samples" / g.name)
        images.append(f"samples/{g.name}")
    (hub / "README.md").write_text(model_card(cfg, out_dir, export, images))
    return hub


def push_to_hub(cfg: Any, out_dir: str | Path, api: Any = None) -> str:
    """Stage the export (:func:`stage`) and upload it to ``cfg.export.push_to_hub`` (created if missing, private
    per ``export.private``). ``api``: a ``huggingface_hub.HfApi`` (default a new one, logged in as the user).
    Returns the URL of the commit."""
    repo = cfg.export.push_to_hub
    if not repo:
        raise ValueError("export.push_to_hub is not set (a hub repo id, user/name)")
    hub = stage(cfg, out_dir)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo, private=cfg.export.private, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(hub), commit_message=f"flowrl {cfg.algorithm} export")
    return str(getattr(info, "commit_url", info))
