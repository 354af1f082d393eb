"""Export a version's weights: merged safetensors, GGUF (f16, q8_0, q4_k_m) and the adapter alone as a GGUF LoRA.

* **Merge** (:func:`merge_adapter`): the base checkpoint is loaded *unquantized* in float32 (a base stored
  quantized is refused), the PEFT adapter is applied and merged (``merge_and_unload``) in float32, and only then
  are the weights cast to the requested dtype (default float16) and saved as safetensors with the tokenizer and a
  model card. An adapter trained with QLoRA on a 4-bit NF4 base merges the same way: into the dequantized 16/32-bit
  weights, never into 4-bit ones (merging into the quantized layer and re-quantizing loses the update).
* **GGUF** (:func:`convert_to_gguf`): llama.cpp's own ``convert_hf_to_gguf.py`` (f16/q8_0/f32/bf16), and for the
  k-quants llama.cpp's quantizer through llama-cpp-python's ``llama_model_quantize`` on the f16 file.
* **GGUF LoRA** (:func:`convert_lora_to_gguf`): llama.cpp's ``convert_lora_to_gguf.py``.

The converter scripts are not in llama-cpp-python's wheel; they come from its sdist on PyPI (pinned to
:data:`LLAMA_CPP_PYTHON_VERSION`, the version installed): ``python -m neuroweaver_ml.export fetch-tools`` (run by
``make install``) extracts ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/`` and ``gguf-py/``
into :func:`tools_dir`. The scripts run in a subprocess of this interpreter with their own gguf-py first on the path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NeuroWeaverMLError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Files of the sdist's vendor/llama.cpp that the export needs (llama.cpp is MIT licensed; its LICENSE travels along).
_TOOL_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
_COMPLETE = ".complete.json"

# Export formats and their quantizations (the first one is the default).
FORMAT_MERGED = "merged"
FORMAT_GGUF = "gguf"
FORMAT_GGUF_LORA = "gguf-lora"
QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    FORMAT_MERGED: ("f16", "bf16", "f32"),
    FORMAT_GGUF: ("f16", "q8_0", "q4_k_m", "f32", "bf16"),
    FORMAT_GGUF_LORA: ("f16", "q8_0", "f32", "bf16"),
}
_CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's k-quants, produced by its quantizer from the f16 GGUF (name -> llama_ftype constant in llama_cpp).
_KQUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


class ExportFailed(NeuroWeaverMLError):
    """An export could not be made; the message says why and what to do (no server paths)."""

    reason = "EXPORT_FAILED"


class ExportToolsMissing(ExportFailed):
    """llama.cpp's converter scripts (or llama-cpp-python, for k-quants) are not installed here."""

    reason = "EXPORT_TOOLS_MISSING"


def tools_dir() -> Path:
    """Where the converter scripts live: ``$NW_LLAMA_CPP_TOOLS`` or ``<venv>/share/neuroweaver/llama.cpp-<version>``."""
    env = os.environ.get("NW_LLAMA_CPP_TOOLS")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "neuroweaver" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def require_tools() -> Path:
    d = tools_dir()
    if not (d / _COMPLETE).is_file():
        raise ExportToolsMissing(
            f"llama.cpp's converter scripts (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist) are not installed on this "
            "worker: run `make install` or `python -m neuroweaver_ml.export fetch-tools`"
        )
    return d


def fetch_tools(dest: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None) -> Path:
    """Extract the converter scripts from the llama-cpp-python sdist into ``dest`` (default :func:`tools_dir`).

    The sdist is ``sdist`` when given, else downloaded from the configured package index by pip
    (``pip download --no-deps --no-binary :all: llama-cpp-python==<version>``). Atomic: staged next to ``dest``
    and renamed; an existing complete ``dest`` is kept.
    """
    target = Path(dest) if dest is not None else tools_dir()
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama-tools.", dir=target.parent) as tmp:
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
                check=True,
            )  # fmt: skip
            found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if not found:
                raise ExportToolsMissing(f"pip did not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
            sdist = found[0]
        from .artifacts import sha256_file

        staged = Path(tmp) / "tools"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist, "r:gz") as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix) :].split("/")[0] in _TOOL_MEMBERS
                and (m.isfile() or m.isdir())
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staged, members=members, filter="data")
        missing = [name for name in _TOOL_MEMBERS if not (staged / name).exists()]
        if missing:
            raise ExportToolsMissing(f"the llama-cpp-python sdist lacks {', '.join(missing)}")
        (staged / _COMPLETE).write_text(
            json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "sdist_sha256": sha256_file(sdist)}) + "\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.rename(staged, target)
    return target


@dataclass
class ExportResult:
    """What an export wrote: a file (GGUF) or a directory (merged), its format, quantization and the tool."""

    path: Path
    format: str
    quantization: str
    tool: str
    seconds: float = 0.0
    details: dict[str, str] = field(default_factory=dict)


_TORCH_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()


def merge_adapter(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quantization: str = "f16",
    card: dict[str, str] | None = None,
) -> ExportResult:
    """Merge a PEFT LoRA adapter into its base through a dequantized float32 base, save as ``quantization`` dtype.

    ``out_dir`` must not exist. The tokenizer is the adapter's when it carries one (the trainer stores it there),
    else the base's. ``card`` adds lines to the model card (README.md), e.g. the registry version name.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    if quantization not in QUANTIZATIONS[FORMAT_MERGED]:
        raise ExportFailed(f"merged weights are saved as {', '.join(QUANTIZATIONS[FORMAT_MERGED])}, not {quantization!r}")
    base, adapter, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(str(out))
    if not (adapter / "adapter_config.json").is_file():
        raise ExportFailed("the version's artifact is not a PEFT LoRA adapter (no adapter_config.json)")
    peft_cfg = PeftConfig.from_pretrained(str(adapter))
    if getattr(peft_cfg, "peft_type", None) is not None and str(peft_cfg.peft_type.value).upper() != "LORA":
        raise ExportFailed(f"only LoRA adapters merge; this one is {peft_cfg.peft_type.value}")
    if getattr(peft_cfg, "task_type", None) not in (None, "CAUSAL_LM"):
        raise ExportFailed(f"only causal-LM adapters export; this one is {peft_cfg.task_type} (a reward model?)")
    config = AutoConfig.from_pretrained(str(base))
    if getattr(config, "quantization_config", None):
        raise ExportFailed(
            "the base checkpoint is stored quantized; merging needs a 16/32-bit base (the QLoRA adapter's own base, unquantized)"
        )
    # Full precision first: merge in float32, cast after. Never load the base with a quantization config.
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged = merged.to(getattr(torch, _TORCH_DTYPES[quantization]))
    merged.config.dtype = _TORCH_DTYPES[quantization]
    tokenizer = AutoTokenizer.from_pretrained(str(adapter if _has_tokenizer(adapter) else base))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staged = tmp / "merged"
        merged.save_pretrained(str(staged), safe_serialization=True)
        tokenizer.save_pretrained(str(staged))
        lines = [
            "---",
            "library_name: transformers",
            "tags: [neuroweaver, lora-merged]",
            "---",
            "",
            "# Merged model",
            "",
            "A LoRA adapter merged into its base by NeuroWeaver: the base was loaded unquantized (float32), the adapter "
            f"merged in float32 (peft merge_and_unload, safe_merge) and the result saved as {_TORCH_DTYPES[quantization]} "
            "safetensors.",
            "",
            f"- adapter: rank {getattr(peft_cfg, 'r', '?')}, alpha {getattr(peft_cfg, 'lora_alpha', '?')}, "
            f"target modules {sorted(peft_cfg.target_modules) if peft_cfg.target_modules else '?'}",
        ]
        lines += [f"- {k}: {v}" for k, v in (card or {}).items()]
        (staged / "README.md").write_text("\n".join(lines) + "\n")
        os.rename(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del merged, peft_model, model
    return ExportResult(out, FORMAT_MERGED, quantization, "peft merge_and_unload (float32 base)", time.monotonic() - t0)


def _run_script(script: str, args: list[str], what: str) -> None:
    tools = require_tools()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the scripts put their own gguf-py first on sys.path
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, str(tools / script), *args], capture_output=True, text=True, env=env, cwd=str(tools))
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        log.warning("%s failed (exit %s):\n%s", script, proc.returncode, proc.stderr[-4000:])
        raise ExportFailed(f"{what} failed (llama.cpp {script}, exit {proc.returncode}): {tail[-600:]}")


def _tool_name(script: str) -> str:
    return f"llama.cpp {script.removesuffix('.py')} (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, quantization: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (``llama_model_quantize`` through llama-cpp-python) from a 16/32-bit GGUF."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ExportToolsMissing(f"{quantization} needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} installed") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _KQUANTS[quantization])
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportFailed(f"llama.cpp quantization to {quantization} failed (llama_model_quantize returned {rc})")


def convert_to_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, quantization: str = "f16") -> ExportResult:
    """A merged HF checkpoint (:func:`merge_adapter`) as one GGUF file: llama.cpp's converter, then its quantizer
    for the k-quants. ``out_file`` must not exist."""
    t0 = time.monotonic()
    if quantization not in QUANTIZATIONS[FORMAT_GGUF]:
        raise ExportFailed(f"GGUF quantization is one of {', '.join(QUANTIZATIONS[FORMAT_GGUF])}, not {quantization!r}")
    out = Path(out_file)
    if out.exists():
        raise FileExistsError(str(out))
    script = "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        outtype = quantization if quantization in _CONVERTER_OUTTYPES else "f16"
        staged = Path(tmp) / f"model-{outtype}.gguf"
        _run_script(script, [str(model_dir), "--outfile", str(staged), "--outtype", outtype], "GGUF conversion")
        tool = _tool_name(script)
        if quantization in _KQUANTS:
            quantized = Path(tmp) / f"model-{quantization}.gguf"
            quantize_gguf(staged, quantized, quantization)
            staged = quantized
            tool += " + llama_model_quantize"
        os.rename(staged, out)
    return ExportResult(out, FORMAT_GGUF, quantization, tool, time.monotonic() - t0)


def convert_lora_to_gguf(
    adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, out_file: str | os.PathLike, quantization: str = "f16"
) -> ExportResult:
    """A PEFT LoRA adapter alone as a GGUF LoRA (llama.cpp ``convert_lora_to_gguf.py``; the base's config is read
    from ``base_dir``). Apply it in llama.cpp on any GGUF of the same base."""
    t0 = time.monotonic()
    if quantization not in QUANTIZATIONS[FORMAT_GGUF_LORA]:
        raise ExportFailed(f"GGUF LoRA type is one of {', '.join(QUANTIZATIONS[FORMAT_GGUF_LORA])}, not {quantization!r}")
    out = Path(out_file)
    if out.exists():
        raise FileExistsError(str(out))
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ExportFailed("the version's artifact is not a PEFT LoRA adapter (no adapter_config.json)")
    script = "convert_lora_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / "adapter.gguf"
        _run_script(
            script,
            ["--base", str(base_dir), "--outfile", str(staged), "--outtype", quantization, str(adapter_dir)],
            "GGUF LoRA conversion",
        )
        os.rename(staged, out)
    return ExportResult(out, FORMAT_GGUF_LORA, quantization, _tool_name(script), time.monotonic() - t0)


def export(
    fmt: str,
    quantization: str,
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    card: dict[str, str] | None = None,
) -> ExportResult:
    """One export of an adapter on its base into ``out_dir`` (created; must not exist): ``merged`` → ``out_dir``
    itself is the checkpoint; ``gguf`` → ``out_dir/model-<quant>.gguf`` (merged through a f32 base first, in a
    temp dir); ``gguf-lora`` → ``out_dir/adapter-<quant>.gguf``."""
    if fmt not in QUANTIZATIONS:
        raise ExportFailed(f"export format is one of {', '.join(QUANTIZATIONS)}, not {fmt!r}")
    quantization = quantization or QUANTIZATIONS[fmt][0]
    if quantization not in QUANTIZATIONS[fmt]:
        raise ExportFailed(f"{fmt} quantization is one of {', '.join(QUANTIZATIONS[fmt])}, not {quantization!r}")
    out = Path(out_dir)
    if fmt == FORMAT_MERGED:
        return merge_adapter(base_dir, adapter_dir, out, quantization=quantization, card=card)
    out.mkdir(parents=True)
    if fmt == FORMAT_GGUF_LORA:
        return convert_lora_to_gguf(adapter_dir, base_dir, out / f"adapter-{quantization}.gguf", quantization)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".merge.", dir=out) as tmp:
        # f32 checkpoints keep the merged weights exact for the converter, which casts them once to the GGUF type.
        merged = merge_adapter(base_dir, adapter_dir, Path(tmp) / "merged", quantization="f32", card=card)
        res = convert_to_gguf(merged.path, out / f"model-{quantization}.gguf", quantization)
    res.tool = f"{merged.tool} + {res.tool}"
    res.seconds = time.monotonic() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neuroweaver_ml.export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-tools", help="extract llama.cpp's converter scripts from the llama-cpp-python sdist")
    f.add_argument("--dest", default=None, help=f"default: {tools_dir()}")
    f.add_argument("--sdist", default=None, help="a downloaded llama_cpp_python-<version>.tar.gz (else pip downloads it)")
    e = sub.add_parser("run", help="export an adapter on its base")
    e.add_argument("--format", required=True, choices=list(QUANTIZATIONS))
    e.add_argument("--quant", default="")
    e.add_argument("--base", required=True)
    e.add_argument("--adapter", required=True)
    e.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "fetch-tools":
        print(fetch_tools(args.dest, args.sdist))
        return 0
    res = export(args.format, args.quant, args.base, args.adapter, args.out)
    print(json.dumps({"path": str(res.path), "format": res.format, "quantization": res.quantization, "tool": res.tool}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
