"""NeuroWeaver ML core: base models, datasets, LoRA/QLoRA SFT, artifacts and generation.

Plain Python (dataclasses and functions), no gRPC and no SQL. Heavy imports (torch,
transformers) happen inside the functions that need them, so importing this package is cheap.
"""

from .artifacts import (
    confine_path,
    digest_path,
    fetch_artifact,
    path_to_uri,
    sha256_file,
    store_artifact,
    uri_to_path,
    verify_digest,
)
from .datasets import (
    DatasetProblem,
    ValidationReport,
    load_rows,
    split_train_eval,
    tokenize_row,
    tokenize_rows,
    validate_dataset,
)
from .errors import (
    DatasetInvalid,
    DigestMismatch,
    ModelNotFound,
    NeuroWeaverMLError,
    PathNotAllowed,
    ResumeMismatch,
)
from .generation import (
    GenerationResult,
    LoadedModel,
    StreamDelta,
    encode_prompt,
    generate,
    generate_batch,
    generate_stream,
    load_for_inference,
)
from .lora import find_lora_target_modules
from .models import (
    BUILTIN_MODELS,
    build_tiny_llama,
    build_tiny_tokenizer,
    convert_gguf_to_hf,
    default_cache_dir,
    ensure_builtin,
    resolve_base_model,
)
from .training import (
    CheckpointEvent,
    EvalEvent,
    ResumedEvent,
    SFTConfig,
    SFTResult,
    StepEvent,
    event_to_dict,
    find_resume_checkpoint,
    run_sft,
)

__all__ = [
    "BUILTIN_MODELS", "CheckpointEvent", "DatasetInvalid", "DatasetProblem", "DigestMismatch", "EvalEvent",
    "GenerationResult", "LoadedModel", "ModelNotFound", "NeuroWeaverMLError", "PathNotAllowed", "ResumeMismatch",
    "ResumedEvent", "SFTConfig", "SFTResult", "StepEvent", "StreamDelta", "ValidationReport", "build_tiny_llama",
    "build_tiny_tokenizer", "confine_path", "convert_gguf_to_hf", "default_cache_dir", "digest_path",
    "encode_prompt", "ensure_builtin", "event_to_dict", "fetch_artifact", "find_lora_target_modules",
    "find_resume_checkpoint", "generate", "generate_batch", "generate_stream", "load_for_inference", "load_rows",
    "path_to_uri", "resolve_base_model", "run_sft", "sha256_file", "split_train_eval", "store_artifact",
    "tokenize_row", "tokenize_rows", "uri_to_path", "validate_dataset", "verify_digest",
]
