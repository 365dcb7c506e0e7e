"""Loading, saving and the transformers model surface of fastbert's models (mixed into ``AutoModel``).

``from_pretrained`` reads a transformers checkpoint unchanged and takes transformers' keyword arguments the
way transformers does; ``save_pretrained`` writes one transformers loads back; ``num_parameters``,
``get_input_embeddings`` / ``set_input_embeddings`` / ``get_output_embeddings`` and ``resize_token_embeddings``
follow transformers' semantics.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import loading
from .config import EncoderConfig

logger = logging.getLogger("fastbert.modeling")  # the logger users and tests already listen to


class PreTrainedMixin:
    """from_pretrained / save_pretrained and transformers' model methods, for ``AutoModel`` and its heads."""

    # -- loading and saving --
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = "auto",
        output_loading_info: bool = False,
        quantize: str | None = None,
        calibration: Any = None,
        keep: tuple[str, ...] = (),
        **kwargs,
    ):
        """Load a transformers checkpoint (local folder or hub id) unchanged.

        device: where the model runs (default CPU); dtype: parameter dtype (default float32; a name such as
        "float16", or "auto" for the config's ``dtype``); backend: "auto" (triton on CUDA, cpp on CPU when
        built, else torch; torch for a dtype those lack), or "torch" / "cpp" / "triton".
        Missing head weights are initialised and reported (as transformers does); missing encoder weights,
        shape mismatches and corrupt files raise ``CheckpointError``.

        Other keyword arguments are read as transformers' ``from_pretrained`` reads them (``_loading_options``):
        hub ones (``revision``, ``token``, ``cache_dir``, ...) go to the download, ``subfolder`` and ``config``
        are honoured, ``torch_dtype`` is ``dtype`` (deprecated, as in transformers), a one-device ``device_map``
        is ``device``, config attributes (``num_labels=5``) update the config; options that do not apply here
        (``attn_implementation``, ``low_cpu_mem_usage``, ...) are accepted with a one-time log note, options
        that would change what is loaded raise ``ValueError``, and anything else raises ``TypeError``.

        ``quantize="int8"``: int8 inference on the CPU (``fastbert.quantize``; float32 on the CPU only, no
        training); ``calibration`` (texts, tokenized with the folder's tokenizer, or batches) and ``keep``
        (linears left in float32) are ``quantize_``'s arguments.
        """
        from . import quantize as _quantize

        _quantize.check_mode(quantize)
        hub, kwargs = cls._hub_options(kwargs)
        path = loading.resolve_path(path_or_id, **hub)
        subfolder = kwargs.pop("subfolder", "")
        if subfolder:
            path = path / subfolder
        config = kwargs.pop("config", None)
        hf_config = copy.deepcopy(config) if config is not None else loading.load_hf_config(path)
        device, dtype = cls._loading_options(hf_config, device, dtype, kwargs)
        cfg = EncoderConfig.from_hf(hf_config)
        state, unexpected, origin = loading.hf_to_fastbert(loading.read_state_dict(path), cfg, cls.task)
        loading.check_fits(cfg, state, str(path), origin)  # before anything is built: a config can lie about sizes
        with torch.device("meta"):
            model = cls._class_for(hf_config)(hf_config, backend="torch")
        expected = model.state_dict()
        loading.check_shapes(expected, state, origin, str(path))
        unexpected += [k for k in state if k not in expected]
        state = {k: v for k, v in state.items() if k in expected}
        missing = [k for k in expected if k not in state and not model._is_tied(k)]
        optional, required = loading.split_missing(missing)
        if required:
            names = list(loading.fastbert_to_hf({n: expected[n] for n in required}, cfg, None, with_prefix=False))
            raise loading.CheckpointError(
                f"{path}: checkpoint lacks encoder tensors {names[:6]}{' ...' if len(names) > 6 else ''} "
                f"(fastbert {required[:6]})"
            )
        model = model.to_empty(device="cpu")
        model.load_state_dict({**model.state_dict(), **state}, strict=True, assign=False)
        model._init_missing(optional)
        model._tie_weights()
        if optional or unexpected:
            warnings.warn(
                f"fastbert: loading {path.name} into {cls.__name__}: "
                + (f"newly initialised (train them before use): {optional}. " if optional else "")
                + (f"unused checkpoint tensors: {unexpected}." if unexpected else ""),
                stacklevel=2,
            )
        model = model.to(device=device or "cpu", dtype=dtype)
        model.set_backend(backend if backend is not None else "auto")
        model.eval()
        if quantize is not None:
            _quantize.quantize_(model, quantize, calibration, keep, tokenizer=_quantize.folder_tokenizer(path))
        if output_loading_info:
            return model, {"missing_keys": optional, "unexpected_keys": unexpected}
        return model

    def _is_tied(self, name: str) -> bool:
        return False

    def _tie_weights(self) -> None:
        pass

    @torch.no_grad()
    def _init_missing(self, names: list[str]) -> None:
        """Initialise tensors a checkpoint lacked the way transformers does (normal(0, range), zeros, ones)."""
        params = dict(self.named_parameters())
        for name in names:
            p = params[name]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, self.cfg.initializer_range)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers loads back unchanged."""
        if getattr(self, "quantization", None) is not None:
            raise NotImplementedError(
                "save_pretrained() of an int8 model is not supported (its float32 weights are gone): save the float "
                "model and load it with quantize='int8'"
            )
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not self._is_tied(k)}
        hf_state = loading.fastbert_to_hf(state, self.cfg, self.task, with_prefix=self.task is not None)
        hf_state = {k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()}
        self.config.architectures = [self._hf_auto_class()._model_mapping[type(self.config)].__name__]
        self.config.save_pretrained(str(out))
        save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})

    @staticmethod
    def _hf_auto_class():
        """The transformers Auto class whose mapping names this model's architecture."""
        import transformers

        return transformers.AutoModel

    # -- transformers' from_pretrained options --
    #: Passed to the hub download (``huggingface_hub.snapshot_download``); unused for a local folder, as in transformers.
    _HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")
    #: Accepted and ignored, with a one-time log note saying why (transformers' tuning of its own loader).
    _IGNORED_OPTIONS = {
        "attn_implementation": "fastbert runs its own fused attention; choose its kernels with backend=",
        "experts_implementation": "fastbert models have no experts",
        "low_cpu_mem_usage": "fastbert always builds on the meta device and loads each tensor once",
        "trust_remote_code": "fastbert never runs code from a checkpoint",
        "use_safetensors": "fastbert reads model.safetensors when present, else pytorch_model.bin",
        "weights_only": "fastbert always reads pytorch_model.bin with weights_only=True",
        "disable_mmap": "fastbert reads safetensors with their default memory mapping",
        "tqdm_class": "fastbert shows no progress bar while loading",
        "use_kernels": "fastbert's kernels are its backends (backend=)",
        "kernel_config": "fastbert's kernels are its backends (backend=)",
        "allow_all_kernels": "fastbert's kernels are its backends (backend=)",
        "fusion_config": "fastbert fuses its ops itself",
        "generation_config": "fastbert models are encoders and do not generate",
        "max_memory": "fastbert places the whole model on one device (device=)",
        "offload_folder": "fastbert places the whole model on one device (device=)",
        "offload_buffers": "fastbert places the whole model on one device (device=)",
        "offload_state_dict": "transformers 5 ignores it too",
        "mirror": "transformers 5 ignores it too",
        "from_tf": "transformers 5 ignores it too",
        "from_flax": "transformers 5 ignores it too",
        "_fast_init": "transformers 5 ignores it too",
    }
    #: transformers' internal flags (pipelines and Auto classes pass them): accepted without a note.
    _INTERNAL_OPTIONS = ("_from_pipeline", "_from_auto", "_commit_hash")
    #: Options that change what is loaded: accepted at transformers' default value, any other raises ValueError.
    _UNSUPPORTED_OPTIONS = {
        "state_dict": None,
        "quantization_config": None,
        "gguf_file": None,
        "variant": None,
        "key_mapping": None,
        "adapter_kwargs": None,
        "adapter_name": "default",
        "device_mesh": None,
        "distributed_config": None,
        "tp_plan": None,
        "tp_size": None,
        "ignore_mismatched_sizes": False,
    }
    _noted: set[str] = set()  # the ignored options already noted in this process

    @classmethod
    def _hub_options(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split from_pretrained's keyword arguments into (hub download options, the rest)."""
        hub = {k: v for k, v in kwargs.items() if k in cls._HUB_OPTIONS}
        return hub, {k: v for k, v in kwargs.items() if k not in cls._HUB_OPTIONS}

    @classmethod
    def _loading_options(
        cls, hf_config: Any, device: torch.device | str | None, dtype: Any, kwargs: dict[str, Any]
    ) -> tuple[torch.device | str | None, torch.dtype | None]:
        """Read transformers' from_pretrained options (``from_pretrained``'s docstring); return (device, dtype).

        Config attributes among ``kwargs`` are set on ``hf_config``, as transformers does. Ignored options are
        noted once per name through the ``fastbert.modeling`` logger (not ``warnings``): like transformers' own
        notes on ignored loading options they are advice, not a fault of the caller, and must not become errors
        under ``-W error`` in code that passes them for transformers' sake.
        """
        unknown = []
        torch_dtype = kwargs.pop("torch_dtype", None)
        if torch_dtype is not None:  # transformers 5: deprecated alias, dtype wins when both are given
            if "torch_dtype" not in PreTrainedMixin._noted:
                PreTrainedMixin._noted.add("torch_dtype")
                logger.warning("fastbert: `torch_dtype` is deprecated! Use `dtype` instead!")
            dtype = dtype if dtype is not None else torch_dtype
        device = cls._device_from_map(kwargs.pop("device_map", None), device)
        for name, value in kwargs.items():
            if name in cls._INTERNAL_OPTIONS:
                continue
            if name in cls._IGNORED_OPTIONS:
                if name not in PreTrainedMixin._noted:
                    PreTrainedMixin._noted.add(name)
                    reason = cls._IGNORED_OPTIONS[name]
                    logger.warning("fastbert: from_pretrained ignores %s=%r: %s", name, value, reason)
            elif name in cls._UNSUPPORTED_OPTIONS:
                if value is not None and value != {} and value != cls._UNSUPPORTED_OPTIONS[name]:
                    raise ValueError(
                        f"from_pretrained({name}=...) is not supported by fastbert (it loads plain transformers "
                        f"checkpoints as they are); leave it at {cls._UNSUPPORTED_OPTIONS[name]!r}"
                    )
            elif hasattr(hf_config, name) and not callable(getattr(hf_config, name)):
                setattr(hf_config, name, value)  # num_labels=5, id2label=..., problem_type=...: as transformers
            else:
                unknown.append(name)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unexpected keyword arguments {unknown} (neither loading options "
                f"nor attributes of {type(hf_config).__name__})"
            )
        return device, cls._dtype_option(dtype, hf_config)

    @staticmethod
    def _dtype_option(dtype: Any, hf_config: Any) -> torch.dtype | None:
        """A torch dtype from ``dtype=``: a dtype, its name ("float16"), or "auto" (the config's ``dtype``)."""
        if dtype == "auto":
            dtype = getattr(hf_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, its name, or 'auto'; got {dtype!r}")
        return dtype

    @staticmethod
    def _device_from_map(device_map: Any, device: torch.device | str | None) -> torch.device | str | None:
        """The one device a ``device_map`` places the whole model on ("cpu", 0, torch.device, {"": d})."""
        if device_map is None:
            return device
        target = device_map
        if isinstance(device_map, dict) and list(device_map) == [""]:
            target = device_map[""]
        try:
            if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
                target = torch.device("cuda", target)
            elif isinstance(target, (str, torch.device)):
                target = torch.device(target)
            else:
                raise TypeError
        except (TypeError, RuntimeError):
            raise ValueError(
                f"device_map={device_map!r} is not supported: fastbert places the whole model on one device; pass "
                "device= (or a one-device device_map such as 'cpu', 'cuda:0', 0 or {'': 'cuda:0'})"
            ) from None
        if device is not None and torch.device(device) != target:
            raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
        return target

    @classmethod
    def _class_for(cls, hf_config: Any) -> type:
        """The class to build for ``hf_config``: the subclass named as transformers names its model (e.g.
        ``BertForSequenceClassification``, defined in ``fastbert.heads``), so that transformers' checks by class
        name (pipelines) accept it; ``cls`` itself when there is none."""
        return PreTrainedMixin._named.get((cls, getattr(hf_config, "model_type", None)), cls)

    _named: dict[tuple[type, str], type] = {}  # (fastbert Auto class, model_type) -> named subclass

    # -- transformers' embedding API --
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters, tied ones counted once; as transformers' ``num_parameters``."""
        embeddings = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not (exclude_embeddings and name in embeddings) and (p.requires_grad or not only_trainable)
        )

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table, (vocab_size, embedding_size)."""
        return self.embeddings.word

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding table (as transformers; a tied masked-LM decoder is tied to it at once)."""
        if not isinstance(value, nn.Embedding) or value.embedding_dim != self.cfg.embedding_size:
            raise ValueError(
                f"set_input_embeddings takes an nn.Embedding of width {self.cfg.embedding_size}, got {value!r}"
            )
        self.embeddings.word = value
        self.cfg = dataclasses.replace(self.cfg, vocab_size=value.num_embeddings)  # the ids check reads it
        self._tie_weights()

    def get_output_embeddings(self) -> nn.Module | None:
        """The output projection onto the vocabulary (the masked-LM decoder); None for other models."""
        return None

    @torch.no_grad()
    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary, as transformers' ``resize_token_embeddings`` does.

        Kept rows are copied; new rows are drawn like transformers draws them (same random numbers for the same
        seed): from a normal distribution with the old rows' mean and 1e-9 x their covariance
        (``mean_resizing=True``), or normal(0, initializer_range). ``config.vocab_size`` is updated and a masked-LM
        decoder and its bias are resized with the table (tied: new bias entries 0). Returns the embedding module.
        """
        old = self.embeddings.word
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int):
                raise ValueError(f"pad_to_multiple_of must be an integer, got {pad_to_multiple_of!r}")
            wanted = old.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-wanted // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if new_num_tokens != old.num_embeddings:
            fresh = nn.Embedding(new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
            self._resized_rows(old.weight, fresh.weight, mean_resizing)
            old.weight.data = fresh.weight.data  # the same Parameter: a tied decoder follows
            old.num_embeddings = new_num_tokens
            self._resize_output_embeddings(new_num_tokens, mean_resizing)
        self.config.vocab_size = new_num_tokens
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_num_tokens)
        self._tie_weights()
        return old

    def _resize_output_embeddings(self, new_num_tokens: int, mean_resizing: bool) -> None:
        """Resize what projects onto the vocabulary (the masked-LM head overrides this)."""

    def _resized_rows(self, old: Tensor, new: Tensor, mean_resizing: bool) -> None:
        """Fill ``new`` (rows, width) from ``old``: kept rows copied, added rows drawn as transformers does."""
        old_n, new_n = old.shape[0], new.shape[0]
        added = new_n - old_n
        if added > 0 and not mean_resizing:
            new.normal_(0.0, self.cfg.initializer_range)
        elif added > 0:
            rows = old.float()
            mean = rows.mean(0)
            centered = rows - mean
            covariance = centered.T @ centered / old_n
            if torch.distributions.constraints.positive_definite.check(1e-9 * covariance).all():
                dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
                new[-added:] = dist.sample((added,)).to(old.dtype)
            else:
                new[-added:] = mean[None].expand(added, -1).to(old.dtype)
        keep = min(old_n, new_n)
        new[:keep] = old[:keep]
