"""Hub round trips for the package's pipelines: load a pushed repo by its id, and keep the model card.

diffusers 0.42 downloads a Hub repo component by component and accepts a component's library only if
it is ``diffusers`` or ``transformers`` (or the folder ships the component's code): a repo pushed from
this package names ``diffusers_blind.models...`` (the kernel estimator, DvSR's predictor), so loading
it by id fails there. :class:`HubPipelineMixin` fetches the whole repo with
``huggingface_hub.snapshot_download`` (the cache, ``revision``, ``token`` and ``local_files_only`` as
usual) and then loads the local folder, which diffusers does resolve from the imported package.

A pipeline loaded from a folder with a ``README.md`` (the shipped default folders carry their model
card: data, training, licence and attribution) keeps that card's text. ``save_pretrained`` writes it
into a target folder that has no ``README.md``; ``push_to_hub`` uploads it in place of diffusers'
generic card when the Hub repo has no card yet (a card already on the Hub is kept).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

MODEL_CARD = "README.md"
# from_pretrained arguments that only steer the download; they mean nothing for a local folder
_DOWNLOAD_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def is_hub_id(name_or_path) -> bool:
    """A ``"user/repo"`` or ``"repo"`` string that is not a local folder."""
    return isinstance(name_or_path, str) and not os.path.isdir(name_or_path)


def download_snapshot(repo_id: str, kwargs: dict) -> str:
    """The local folder of ``repo_id``'s snapshot; the download arguments are taken out of ``kwargs``."""
    from huggingface_hub import snapshot_download

    if repo_id.count("/") > 1:
        raise ValueError(f"{repo_id!r} is neither a local folder nor a Hub repo id ('user/name')")
    if kwargs.pop("proxies", None) is not None:
        raise ValueError("proxies= is not supported by huggingface_hub's snapshot download: set HTTPS_PROXY instead")
    options = {name: kwargs.pop(name) for name in _DOWNLOAD_ARGUMENTS if name in kwargs}
    try:
        return snapshot_download(repo_id, **options)
    except Exception as error:  # offline, no such repo, no access...: say that a local folder was looked for too
        raise OSError(f"{repo_id!r} is not a local folder, and fetching it from the Hugging Face Hub failed "
                      f"({type(error).__name__}: {error})") from error


def read_model_card(folder) -> str | None:
    """The text of ``folder/README.md``, or ``None``."""
    card = Path(folder) / MODEL_CARD
    return card.read_text(encoding="utf-8") if card.is_file() else None


class HubPipelineMixin:
    """Put before ``DiffusionPipeline`` in a pipeline's bases (see the module docstring)."""

    _source_model_card: str | None = None
    _source_folder: str | None = None

    @classmethod
    def local_folder(cls, pretrained_model_name_or_path, kwargs: dict):
        """A local folder for ``pretrained_model_name_or_path``: itself, or its downloaded Hub snapshot."""
        if is_hub_id(pretrained_model_name_or_path):
            return download_snapshot(pretrained_model_name_or_path, kwargs)
        return pretrained_model_name_or_path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = cls.local_folder(pretrained_model_name_or_path, kwargs)
        _warn_on_another_pipeline(cls, folder)
        pipe = super().from_pretrained(folder, **kwargs)
        if is_hub_id(pretrained_model_name_or_path):  # the repo id, as diffusers records it, not the cache path
            pipe.register_to_config(_name_or_path=pretrained_model_name_or_path)
        pipe._source_model_card = read_model_card(folder)
        pipe._source_folder = str(folder)
        return pipe

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        self._write_source_card(save_directory)

    def _write_source_card(self, folder) -> None:
        """The source folder's card, with the figures it shows, into ``folder`` where it has no card yet."""
        card = Path(folder) / MODEL_CARD
        if self._source_model_card is None or card.exists():
            return
        note = (f"\n> Saved by `{type(self).__name__}.save_pretrained` from `{Path(self._source_folder).name}`. "
                "Files this card names that the pipeline does not save (extra sub-models) are not in this folder.\n")
        card.write_text(_after_front_matter(self._source_model_card, note), encoding="utf-8")
        for figure in Path(self._source_folder).glob("*.png"):
            if f"({figure.name})" in self._source_model_card and not (Path(folder) / figure.name).exists():
                shutil.copyfile(figure, Path(folder) / figure.name)

    def _upload_folder(self, working_dir, repo_id, token=None, **kwargs):
        """diffusers' upload of a saved folder; the source card replaces the generic one on a card-less repo."""
        if self._source_model_card is not None and not kwargs.get("subfolder") and not _hub_has_card(repo_id, token):
            (Path(working_dir) / MODEL_CARD).unlink(missing_ok=True)  # diffusers' generic card
            self._write_source_card(working_dir)
        return super()._upload_folder(working_dir, repo_id, token=token, **kwargs)


def _hub_has_card(repo_id: str, token) -> bool:
    from huggingface_hub import file_exists

    return file_exists(repo_id, MODEL_CARD, token=token)


def _warn_on_another_pipeline(cls, folder) -> None:
    """A folder saved by another pipeline class (not ``cls`` or one of its bases) loads, but its settings mean
    something else there (BlindDPS's ``guidance_scale`` is not Fast EM's): say so."""
    index = Path(folder) / "model_index.json"
    try:
        saved_by = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):  # missing or unreadable: diffusers reports it with the path
        return
    if isinstance(saved_by, str) and saved_by not in {base.__name__ for base in cls.__mro__}:
        warnings.warn(f"{folder} was saved by {saved_by}, not {cls.__name__}: its settings (guidance_scale, ...) "
                      f"were tuned for {saved_by}; load it with {saved_by}.from_pretrained, or pass the settings "
                      f"{cls.__name__} should use", stacklevel=3)


def _after_front_matter(card: str, note: str) -> str:
    """``card`` with ``note`` inserted after its YAML front matter (the Hub reads the licence from it)."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            end = card.index("\n", end + 1) + 1 if "\n" in card[end + 1:] else len(card)
            return card[:end] + note + card[end:]
    return note + card
