"""Contract tests every deblurring pipeline of the package must pass (diffusers' ``PipelineTesterMixin`` in spirit).

A pipeline's test class inherits :class:`PipelineTesterMixin` and provides:

* ``pipeline_class`` — the ``DiffusionPipeline`` subclass under test;
* ``get_dummy_components()`` — the ``__init__`` keyword arguments built from tiny random models
  (``conftest.tiny_unet``, ``conftest.tiny_ddpm``);
* ``get_dummy_inputs(seed=0, batch=1)`` — ``__call__`` keyword arguments: ``image`` a ``(B, C, H, W)``
  tensor in ``[0, 1]``, ``generator`` (a list of ``batch`` generators when ``batch > 1``),
  ``num_inference_steps`` (a few), ``output_type="np"`` and whatever else the method needs;
* optionally ``returns_kernel`` (``False`` for a method that estimates no kernel), ``batch_tolerance``
  and ``extra_bad_inputs`` (``(kwargs, exception, message regex)`` cases of its own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from diffusers_blind import DeblurPipelineOutput


GENERIC_BAD_INPUTS = [
    (dict(output_type="jpeg"), ValueError, "output_type"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=True), ValueError, "num_inference_steps"),  # a bool is not a step count
    (dict(callback_on_step_end_tensor_inputs=["not_a_tensor"]), ValueError, "callback_on_step_end_tensor_inputs"),
    (dict(image=torch.full((1, 3, 16, 16), float("nan"))), ValueError, "NaN"),
    (dict(image=torch.rand(1, 3, 16, 16) * 255), ValueError, r"\[0, 1\]"),
    (dict(image=torch.rand(1, 2, 16, 16)), ValueError, "channels"),
    (dict(image="image.png"), TypeError, "PIL image"),
    (dict(image=[]), ValueError, "empty"),
]


class PipelineTesterMixin:
    pipeline_class = None
    returns_kernel = True
    batch_tolerance = 1e-4  # float32 batched convolutions differ from single ones in the last bits
    # save -> load gives bit-identical weights, but the loaded tensors live at other addresses, so the CPU
    # kernels may take other vector paths; a guided run amplifies those last-bit differences a little
    round_trip_tolerance = 1e-5
    extra_bad_inputs: list = []

    def get_dummy_components(self) -> dict:
        raise NotImplementedError

    def get_dummy_inputs(self, seed: int = 0, batch: int = 1) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def get_pipeline(self, components: dict | None = None):
        pipe = self.pipeline_class(**(components or self.get_dummy_components()))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(self, pipe, seed: int = 0, batch: int = 1, **overrides):
        inputs = self.get_dummy_inputs(seed=seed, batch=batch)
        inputs.update(overrides)
        return pipe(**inputs)

    @staticmethod
    def as_array(images) -> np.ndarray:
        if isinstance(images, list):
            return np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
        return images.numpy() if torch.is_tensor(images) else np.asarray(images)

    # ------------------------------------------------------------------ outputs
    def test_output_types_shapes_and_dtypes(self):
        pipe = self.get_pipeline()
        image = self.get_dummy_inputs(batch=2)["image"]
        batch, channels, height, width = image.shape
        out_np = self.call(pipe, batch=2, output_type="np")
        assert isinstance(out_np, DeblurPipelineOutput)
        assert out_np.images.shape == (batch, height, width, channels) and out_np.images.dtype == np.float32
        assert out_np.images.min() >= 0 and out_np.images.max() <= 1
        out_pt = self.call(pipe, batch=2, output_type="pt")
        assert out_pt.images.shape == (batch, channels, height, width) and out_pt.images.dtype == torch.float32
        np.testing.assert_allclose(out_pt.images.permute(0, 2, 3, 1).numpy(), out_np.images, atol=1e-6)
        out_pil = self.call(pipe, batch=2, output_type="pil")
        assert len(out_pil.images) == batch and all(isinstance(im, PIL.Image.Image) for im in out_pil.images)
        assert out_pil.images[0].size == (width, height)
        np.testing.assert_allclose(self.as_array(out_pil.images), out_np.images, atol=1 / 255 + 1e-6)

    def test_kernels_are_returned_exactly_when_the_method_estimates_them(self):
        out = self.call(self.get_pipeline(), output_type="np")
        if not self.returns_kernel:
            assert out.kernels is None
            return
        assert out.kernels.ndim == 3 and out.kernels.shape[0] == 1 and np.isfinite(out.kernels).all()
        np.testing.assert_allclose(out.kernels.sum((-2, -1)), 1.0, atol=1e-4)

    def test_latent_output_gives_kernels_as_a_b_1_k_k_tensor_like_pt(self):
        pipe = self.get_pipeline()
        latent, pt = self.call(pipe, batch=2, output_type="latent"), self.call(pipe, batch=2, output_type="pt")
        assert torch.is_tensor(latent.images)
        if not self.returns_kernel:
            assert latent.kernels is None
            return
        assert torch.is_tensor(latent.kernels) and latent.kernels.ndim == 4 and latent.kernels.shape[:2] == (2, 1)
        torch.testing.assert_close(latent.kernels.detach().float().cpu(), pt.kernels.float())

    def test_tuple_output_matches_the_dataclass(self):
        pipe = self.get_pipeline()
        out = self.call(pipe)
        as_tuple = self.call(pipe, return_dict=False)
        assert isinstance(as_tuple, tuple)
        np.testing.assert_array_equal(self.as_array(as_tuple[0]), self.as_array(out.images))

    # ------------------------------------------------------------------ reproducibility
    def test_seeded_call_is_reproducible_and_the_seed_matters(self):
        pipe = self.get_pipeline()
        a, b = self.call(pipe, seed=3), self.call(pipe, seed=3)
        np.testing.assert_array_equal(self.as_array(a.images), self.as_array(b.images))
        c = self.call(pipe, seed=4)
        assert np.abs(self.as_array(a.images) - self.as_array(c.images)).max() > 1e-5

    def test_batch_equals_single_with_a_generator_per_image(self):
        pipe = self.get_pipeline()
        batched_inputs = self.get_dummy_inputs(seed=11, batch=2)
        batched = pipe(**batched_inputs)
        for i in range(2):
            single_inputs = self.get_dummy_inputs(seed=11, batch=2)
            single_inputs["image"] = single_inputs["image"][i : i + 1]
            single_inputs["generator"] = [single_inputs["generator"][i]]
            single = pipe(**single_inputs)
            np.testing.assert_allclose(
                self.as_array(batched.images)[i], self.as_array(single.images)[0], atol=self.batch_tolerance
            )
            if self.returns_kernel:
                np.testing.assert_allclose(batched.kernels[i], single.kernels[0], atol=self.batch_tolerance)

    # ------------------------------------------------------------------ saving and components
    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipeline()
        expected = self.call(pipe)
        pipe.save_pretrained(tmp_path)
        assert (tmp_path / "model_index.json").is_file()
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(pipe.config)
        np.testing.assert_allclose(self.as_array(self.call(loaded).images), self.as_array(expected.images),
                                   atol=self.round_trip_tolerance)

    def test_a_hub_repo_id_loads_from_its_snapshot(self, tmp_path, monkeypatch):
        """diffusers' own per-component download refuses the package's component libraries: the whole snapshot is
        fetched instead (with the download arguments), then loaded as a folder."""
        import huggingface_hub

        pipe = self.get_pipeline()
        pipe.save_pretrained(tmp_path / "snapshot")
        asked = {}

        def fake_snapshot_download(repo_id, **kwargs):
            asked.update(repo_id=repo_id, **kwargs)
            return str(tmp_path / "snapshot")

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
        loaded = self.pipeline_class.from_pretrained("someone/deblur-test", revision="v1", local_files_only=True)
        assert asked == dict(repo_id="someone/deblur-test", revision="v1", local_files_only=True)
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(self.as_array(self.call(loaded).images), self.as_array(self.call(pipe).images),
                                   atol=self.round_trip_tolerance)
        with pytest.raises(ValueError, match="HTTPS_PROXY"):
            self.pipeline_class.from_pretrained("someone/deblur-test", proxies={"https": "http://proxy:1"})
        with pytest.raises(ValueError, match="neither a local folder"):
            self.pipeline_class.from_pretrained("not/a/repo/id")

        def offline(repo_id, **kwargs):
            raise ConnectionError("no network")

        monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
        with pytest.raises(OSError, match="'my-models/fast-em' is not a local folder.*ConnectionError"):
            self.pipeline_class.from_pretrained("my-models/fast-em")

    def test_the_model_card_travels_with_the_pipeline(self, tmp_path, monkeypatch):
        """A folder's README.md (licence, attribution) is kept by save_pretrained and by a push to a card-less repo;
        a card already on the Hub, or already in the target folder, is never replaced."""
        import diffusers.utils.hub_utils as hub_utils
        import huggingface_hub
        from huggingface_hub import ModelCard

        self.get_pipeline().save_pretrained(tmp_path / "source")
        card = "---\nlicense: cc-by-sa-4.0\n---\nTrained on photographs by A. Person.\n![samples](samples.png)\n"
        (tmp_path / "source" / "README.md").write_text(card)
        (tmp_path / "source" / "samples.png").write_bytes(b"figure")
        (tmp_path / "source" / "unrelated.png").write_bytes(b"not shown by the card")
        pipe = self.pipeline_class.from_pretrained(tmp_path / "source")
        pipe.save_pretrained(tmp_path / "copy")
        carried = (tmp_path / "copy" / "README.md").read_text()
        # the front matter (licence) stays first, a note says where the copy came from, the text follows
        assert carried.startswith("---\nlicense: cc-by-sa-4.0\n---\n") and "Saved by" in carried
        assert carried.endswith("Trained on photographs by A. Person.\n![samples](samples.png)\n")
        assert (tmp_path / "copy" / "samples.png").read_bytes() == b"figure" and not (tmp_path / "copy" / "unrelated.png").exists()
        (tmp_path / "theirs").mkdir()
        (tmp_path / "theirs" / "README.md").write_text("my own card")
        pipe.save_pretrained(tmp_path / "theirs")
        assert (tmp_path / "theirs" / "README.md").read_text() == "my own card"

        uploaded = []

        class Repo:
            repo_id = "someone/deblur-test"

        monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: Repo())
        monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **k: ModelCard("---\nlibrary_name: diffusers\n---\n"))
        monkeypatch.setattr(hub_utils, "upload_folder",
                            lambda folder_path, **kw: uploaded.append((Path(folder_path) / "README.md").read_text()))
        for hub_has_card in (False, True):
            monkeypatch.setattr(huggingface_hub, "file_exists", lambda *a, **k: hub_has_card)
            pipe.push_to_hub("someone/deblur-test")
        assert uploaded[0] == carried and "library_name: diffusers" in uploaded[1]

    def test_components_rebuild_the_same_pipeline(self):
        pipe = self.get_pipeline()
        rebuilt = self.get_pipeline(pipe.components)
        np.testing.assert_array_equal(self.as_array(self.call(rebuilt).images), self.as_array(self.call(pipe).images))

    def test_device_and_dtype_are_known(self):
        pipe = self.get_pipeline().to("cpu")
        assert pipe.device.type == "cpu" and pipe._execution_device.type == "cpu"
        assert pipe.dtype == torch.float32

    def test_progress_bar_can_be_disabled(self, capsys):
        self.call(self.get_pipeline())
        assert "it/s" not in capsys.readouterr().err

    # ------------------------------------------------------------------ callbacks and interrupt
    def test_callback_on_step_end_sees_every_tensor_and_can_replace_latents(self):
        pipe = self.get_pipeline()
        names = list(pipe._callback_tensor_inputs)
        assert "latents" in names
        steps = []

        def record(p, step, timestep, tensors):
            assert sorted(tensors) == sorted(names) and all(torch.is_tensor(v) for v in tensors.values())
            steps.append(step)
            return tensors

        plain = self.call(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
        assert steps == list(range(pipe.num_timesteps)) and len(steps) > 0

        def zero_last(p, step, timestep, tensors):
            if step == p.num_timesteps - 1:
                tensors["latents"] = torch.zeros_like(tensors["latents"])
            return tensors

        zeroed = self.call(pipe, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["latents"])
        assert np.abs(self.as_array(zeroed.images) - self.as_array(plain.images)).max() > 1e-4

    def test_pipeline_callback_object(self):
        class Record(PipelineCallback):
            tensor_inputs = ["latents"]

            def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
                self.seen = getattr(self, "seen", 0) + 1
                return callback_kwargs

        record = Record()
        pipe = self.get_pipeline()
        self.call(pipe, callback_on_step_end=record)
        assert record.seen == pipe.num_timesteps

    def test_interrupt_and_num_timesteps_are_readable_before_the_first_call(self):
        pipe = self.get_pipeline()
        assert pipe.interrupt is False and pipe.num_timesteps == 0

    def test_interrupt_skips_the_remaining_steps(self):
        steps = []

        def stop(p, step, timestep, tensors):
            steps.append(step)
            p._interrupt = True
            return tensors

        pipe = self.get_pipeline()
        out = self.call(pipe, callback_on_step_end=stop)
        assert steps == [0] and pipe.interrupt
        assert np.isfinite(self.as_array(out.images)).all()

    # ------------------------------------------------------------------ bad inputs
    def test_bad_inputs_raise_clear_errors(self):
        pipe = self.get_pipeline()
        for overrides, error, match in GENERIC_BAD_INPUTS + list(self.extra_bad_inputs):
            with pytest.raises(error, match=match):
                self.call(pipe, **overrides)
