"""Start-up hook of `hf-offload launch`: patch `transformers.Trainer` and `from_pretrained` as soon as a process
imports them.

Python imports `sitecustomize` at start-up from the first folder on `sys.path` that has one; `hf-offload launch`
puts this folder first on PYTHONPATH, and child processes inherit it, so this runs in every Python the launched
command starts (`accelerate launch` and `trl sft` re-exec Python). It imports nothing heavy: it installs an import
hook that, once `transformers.trainer` has been executed, applies `hf_offload.integrations.trainer.patch_trainer()`
to it, and once `transformers.modeling_utils` has, makes `from_pretrained` load causal LMs straight into the host
store (`hf_offload.integrations.store_loading.patch_from_pretrained_for_launch`), so processes that never load a
model or build a Trainer pay nothing. Then it runs the `sitecustomize` it shadows, if there is one.
"""

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys

_TRAINER = "transformers.trainer"
_MODELING = "transformers.modeling_utils"
_SETTINGS = "HF_OFFLOAD_LAYER_STREAMING"
_REPORT = "HF_OFFLOAD_LAUNCH_REPORT"  # hf_offload.integrations.recipe.REPORT_ENV_VAR
_HERE = os.path.dirname(os.path.abspath(__file__))


class _PatchTrainerAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of `transformers.trainer` so the module is patched when loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (_TRAINER, _MODELING):
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # the module looks as if loaded normally
        self._loader.exec_module(module)
        if module.__name__ == _MODELING:
            _patch_loading(module)
            return
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchTrainerAfterImport)]
        ours = sys.modules.get("hf_offload.integrations.trainer")
        if ours is not None and not hasattr(ours, "patch_trainer"):
            return  # our trainer module is importing transformers.trainer; it patches at the end of its own import
        try:
            from hf_offload.integrations.trainer import patch_trainer
        except ImportError as err:
            raise ImportError(
                f"hf-offload launch asked for layer streaming, but this Python ({sys.executable}) cannot import "
                f"hf_offload ({err}). Install hf-offload in the environment the command runs in."
            ) from err
        patch_trainer(module.Trainer)
        _note("trainer-imported")


def _patch_loading(module):
    """`from_pretrained` loads causal LMs into the host store (unless the launcher's `load_into_store` is off).

    Nothing is imported here: `transformers.modeling_utils` may be loading in the middle of another package's import
    (peft's). hf_offload's loading code is imported when the script first calls `from_pretrained`.
    """
    settings = json.loads(os.environ[_SETTINGS])
    if not settings.get("load_into_store", True):
        return
    model_class = module.PreTrainedModel
    original = model_class.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        from hf_offload.integrations.store_loading import load_into_store_for_launch

        return load_into_store_for_launch(original, cls, args, kwargs, settings)

    model_class.from_pretrained = classmethod(from_pretrained)


def _run_shadowed_sitecustomize():
    """Run the `sitecustomize` that this one hides (later on sys.path), as Python would have without us."""
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _note(event):
    """What this process did, for `hf-offload launch`'s closing report (hf_offload.integrations.recipe)."""
    folder = os.environ.get(_REPORT)
    if folder and os.path.isdir(folder):
        with contextlib.suppress(OSError):
            open(os.path.join(folder, f"{event}.{os.getpid()}"), "w").close()


def _drop_third_party_noise():
    """hf_offload's log filters (cheap: `import hf_offload` loads nothing heavy), before the command imports peft."""
    try:
        from hf_offload.verbosity import drop_third_party_noise
    except ImportError:
        return  # the patch reports a missing hf_offload clearly when the Trainer is imported
    drop_third_party_noise()


if os.environ.get(_SETTINGS) and not any(isinstance(f, _PatchTrainerAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchTrainerAfterImport())
    _drop_third_party_noise()
    _note("started")
_run_shadowed_sitecustomize()
