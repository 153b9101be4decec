"""Bring your own model: TorchScript files with a model card run through the same path as checkpoints."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import DEMO_MODEL, SCENE
from helpers import check_error, class_map, cli, run

from segpipe.models.card import card_path


def export(tmp_path, checkpoint=DEMO_MODEL, *extra, fmt="torchscript"):
    out = tmp_path / "exported" / ("unet.onnx" if fmt == "onnx" else "unet.ts")
    out.parent.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "segpipe.cli", "export-model", str(checkpoint), "--format",
                           fmt, "--output", str(out), *extra], capture_output=True, text=True, timeout=300)
    return out, done


def test_one_model_as_checkpoint_torchscript_and_onnx_gives_one_class_map(tmp_path, client):
    """The issue's acceptance: >= 99.9 % identical class maps through the same path, on the SpaceNet scene."""
    ts, done = export(tmp_path)
    assert done.returncode == 0, done.stderr
    onnx, done = export(tmp_path, fmt="onnx")
    assert done.returncode == 0, done.stderr
    for path, fmt in [(ts, "torchscript"), (onnx, "onnx")]:
        card = yaml.safe_load(card_path(path).read_text())
        assert card["format"] == fmt and card["in_channels"] == 1 and card["n_classes"] == 2
        assert card["class_names"] == ["background", "building"] and card["normalisation"]["kind"] == "meanstd"
    job = {"input": str(SCENE), "tile_size": 256}
    ckpt = class_map(run(client, tmp_path / "ckpt", **job, method={"name": "unet", "model": str(DEMO_MODEL)}))
    assert (ckpt == 1).mean() > 0.02  # buildings (3 % of the scene) found
    for name, path in [("ts", ts), ("onnx", onnx)]:
        got = class_map(run(client, tmp_path / name, **job, method={"name": "model", "model": str(path)}))
        assert (got == ckpt).mean() >= 0.999, name


class _Pointwise(torch.nn.Module):
    """One logit per pixel from a 1x1 convolution: the whole-image answer is known without patches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(4.0)
            self.conv.bias.fill_(-2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_window_normalisation_and_a_sigmoid_output_from_the_card(tmp_path, client):
    """Card: clip to [300, 700], scale to 0..1, one sigmoid logit 4x - 2: class 1 where the clipped, scaled
    pixel is above 0.5, i.e. above 500."""
    path = tmp_path / "binary.ts"
    torch.jit.save(torch.jit.script(_Pointwise().eval()), str(path))
    card_path(path).write_text(yaml.safe_dump({
        "format": "torchscript", "in_channels": 1, "n_classes": 1, "output": "sigmoid",
        "class_names": ["dark", "bright"], "normalisation": {"kind": "window", "low": [300], "high": [700]},
        "resolution": [0.5]}))  # the scene's 0.5 m: accepted as it is
    outcome = run(client, tmp_path / "out", input=str(SCENE), tile_size=256,
                  method={"name": "model", "model": str(path), "patch_size": 128})
    with rasterio.open(SCENE) as ds:
        x = ds.read(1).astype(np.float32)
    z = 4.0 * (np.clip(x, 300, 700) - 300) / 400 - 2.0
    expect = (z.astype(np.float16) > 0).astype(np.uint8)
    got = class_map(outcome)
    assert 0.05 < expect.mean() < 0.95 and (got == expect).mean() > 0.9999


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The demo checkpoint exported once as TorchScript (``segpipe export-model``) for the card cases."""
    model, done = export(tmp_path_factory.mktemp("card"))
    assert done.returncode == 0, done.stderr
    return model


@pytest.mark.parametrize("card,message", [
    (None, "needs a model card"),
    ({"format": "torchscript", "in_channels": 1, "n_classes": 2,
      "normalisation": {"kind": "meanstd", "mean": [1, 2], "std": [1, 1]}}, "2 band(s) for in_channels 1"),
    ({"format": "torchscript", "in_channels": 3, "n_classes": 2,
      "normalisation": {"kind": "meanstd", "mean": [0, 0, 0], "std": [1, 1, 1]}}, "expects 3 band(s)"),
    ({"format": "torchscript", "in_channels": 1, "n_classes": 2,
      "normalisation": {"kind": "window", "low": [5], "high": [1]}}, "every high above its low"),
])
def test_a_missing_or_wrong_card_is_refused_before_anything_is_written(tmp_path, exported, card, message):
    """The first case through the CLI (one line, exit 2), the others checked in this process (the same check)."""
    model = tmp_path / exported.name
    shutil.copy(exported, model)
    if card is not None:
        card_path(model).write_text(yaml.safe_dump(card))
    out = tmp_path / "out"
    job = {"input": str(SCENE), "output": str(out), "method": {"name": "model", "model": str(model)}}
    if card is None:
        r = cli(tmp_path, job)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("segpipe: error: ") and message in r.stderr and len(r.stderr.splitlines()) == 1
    else:
        assert message in check_error(tmp_path, job)
    assert not out.exists()


def test_export_model_refuses_what_it_cannot_export(tmp_path):
    bad = tmp_path / "nothing.pt"
    bad.write_bytes(b"not a checkpoint")
    _, done = export(tmp_path, bad)
    assert done.returncode == 2 and done.stderr.startswith("segpipe: error: ") and "Traceback" not in done.stderr
    _, done = export(tmp_path, DEMO_MODEL, "--patch-size", "100")  # the U-Net needs multiples of 16
    assert done.returncode == 2 and "patch_size 100" in done.stderr
    assert not (tmp_path / "exported" / "unet.ts").exists()


def test_a_card_must_match_the_file_it_describes(tmp_path):
    """A TorchScript file whose card says onnx (or a file that is not ONNX under an onnx card) is refused."""
    ts, done = export(tmp_path)
    assert done.returncode == 0, done.stderr
    card = yaml.safe_load(card_path(ts).read_text())
    card_path(ts).write_text(yaml.safe_dump({**card, "format": "onnx"}))
    r = cli(tmp_path, {"input": str(SCENE), "output": str(tmp_path / "a"),
                       "method": {"name": "model", "model": str(ts)}})
    assert r.returncode == 2 and "card says format: onnx" in r.stderr and len(r.stderr.splitlines()) == 1
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x08\x07garbage")
    card_path(fake).write_text(yaml.safe_dump({**card, "format": "onnx"}))
    r = cli(tmp_path, {"input": str(SCENE), "output": str(tmp_path / "b"),
                       "method": {"name": "model", "model": str(fake)}})
    assert r.returncode == 2 and "not a loadable ONNX file" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


NETWORK = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
           "strides": [2, 2], "num_res_units": 1}


def _bundle(root, transforms, network=None):
    """A MONAI bundle folder as MONAI's own bundle tools lay it out: weights of a seeded 2-D MONAI UNet
    (``NETWORK``), its config naming ``network`` (default ``NETWORK``)."""
    from monai.networks.nets import UNet

    network = network or NETWORK
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {"imports": ["$import torch"], "device": "$torch.device('cpu')", "network_def": network,
              "network": "$@network_def.to(@device)",
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
                  *transforms, {"_target_": "EnsureTyped", "keys": "image"}]},
              "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [128, 128], "sw_batch_size": 4}}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [128, 128]}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "bright"}}}}}))
    torch.manual_seed(3)
    net = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"}).eval()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return net


def test_a_monai_bundle_runs_as_the_same_network_saved_as_a_checkpoint(tmp_path, client):
    from segpipe.models.checkpoint import ModelSpec, save_checkpoint

    bundle = tmp_path / "bundle"
    net = _bundle(bundle, [{"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": 450.0,
                            "divisor": 250.0}])
    ckpt = tmp_path / "same.pt"
    save_checkpoint(ckpt, net, ModelSpec(in_channels=1, n_classes=2, mean=[450.0], std=[250.0],
                                         class_names=["background", "bright"], arch="monai.UNet",
                                         arch_kwargs={"channels": [8, 16, 32], "strides": [2, 2],
                                                      "num_res_units": 1}))
    job = {"input": str(SCENE), "tile_size": 256}
    got = run(client, tmp_path / "b", **job, method={"name": "model", "model": str(bundle), "patch_size": 128})
    ref = class_map(run(client, tmp_path / "c", **job, method={"name": "model", "model": str(ckpt), "patch_size": 128}))
    np.testing.assert_array_equal(class_map(got), ref)
    assert 0 < ref.mean() < 1
    import zarr

    assert zarr.open_group(got.result, mode="r").attrs["class_names"] == ["background", "bright"]


@pytest.mark.parametrize("transforms,network,message", [
    ([{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 2000, "b_min": 0, "b_max": 1,
       "clip": True}, {"_target_": "Spacingd", "keys": "image", "pixdim": [500, 500]}], None,
     "trained at 500 x 500 per pixel, this scene has 0.5 x 0.5: more than 16x apart"),
    ([{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}], None, "over nonzero voxels only"),
    ([], {"_target_": "$monai.networks.nets.UNet(2, 1, 2, (8, 16), (2,))"}, "not a monai.networks.nets class"),
    ([], {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": "@chans",
          "strides": [2, 2]}, "is an expression"),
])
def test_a_bundle_segpipe_cannot_read_as_plain_data_is_refused_in_one_line(tmp_path, transforms, network, message):
    bundle = tmp_path / "bundle"
    _bundle(bundle, transforms, network)
    out = tmp_path / "out"
    job = {"input": str(SCENE), "output": str(out), "method": {"name": "model", "model": str(bundle),
                                                                "patch_size": 128}}
    assert message in check_error(tmp_path, job)  # the check run refuses with, in this process
    assert not out.exists()


def test_a_scene_zscore_uses_the_whole_scenes_statistics_for_every_tile(tmp_path, client):
    """NormalizeIntensity without values (MONAI's per-image z-score): the same classes as the same network with
    the scene's mean and standard deviation, recounted here from the file, as fixed values, for any tile size."""
    from segpipe.models.checkpoint import ModelSpec, save_checkpoint

    bundle = tmp_path / "bundle"
    net = _bundle(bundle, [{"_target_": "NormalizeIntensityd", "keys": "image"}])
    with rasterio.open(SCENE) as ds:
        x = ds.read(1).astype(np.float64)
    ckpt = tmp_path / "fixed.pt"
    save_checkpoint(ckpt, net, ModelSpec(in_channels=1, n_classes=2, mean=[float(x.mean())], std=[float(x.std())],
                                         arch="monai.UNet", arch_kwargs={"channels": [8, 16, 32], "strides": [2, 2],
                                                                         "num_res_units": 1}))
    maps = [class_map(run(client, tmp_path / f"z{tile}", input=str(SCENE), tile_size=tile,
                          method={"name": "model", "model": str(bundle), "patch_size": 128})) for tile in (256, 512)]
    ref = class_map(run(client, tmp_path / "fixed", input=str(SCENE), tile_size=256,
                        method={"name": "model", "model": str(ckpt), "patch_size": 128}))
    np.testing.assert_array_equal(maps[0], maps[1])
    assert (maps[0] == ref).mean() > 0.999 and 0 < ref.mean() < 1


def test_a_scene_minmax_scales_by_the_whole_scenes_range_for_every_tile(tmp_path, client):
    """nnU-Net's RescaleTo01Normalization as a card's scene_minmax: the same classes as a fixed min-max card with
    the scene's valid range recounted here from the file, for any tile size."""
    with rasterio.open(SCENE) as ds:
        x = ds.read(1)
        valid = x[x != ds.nodata]
    cards = {"scene": {"kind": "scene_minmax"},
             "fixed": {"kind": "minmax", "low": [float(valid.min())], "high": [float(valid.max())]}}
    paths = {}
    for name, norm in cards.items():
        paths[name] = tmp_path / f"{name}.ts"
        net = _Pointwise().eval()
        with torch.no_grad():
            net.conv.bias.fill_(-0.4)  # class 1 above a tenth of the range (15 % of this scene's pixels)
        torch.jit.save(torch.jit.script(net), str(paths[name]))
        card_path(paths[name]).write_text(yaml.safe_dump({"format": "torchscript", "in_channels": 1, "n_classes": 1,
                                                           "output": "sigmoid", "normalisation": norm}))
    maps = [class_map(run(client, tmp_path / f"s{tile}", input=str(SCENE), tile_size=tile,
                          method={"name": "model", "model": str(paths["scene"]), "patch_size": 128}))
            for tile in (256, 512)]
    ref = class_map(run(client, tmp_path / "fixed", input=str(SCENE), tile_size=256,
                        method={"name": "model", "model": str(paths["fixed"]), "patch_size": 128}))
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[0], ref)
    assert 0.01 < (ref == 1).mean() < 0.99


def test_mirroring_averages_every_flip_and_keeps_tiling_invariance(tmp_path, client, tiny_model):
    from segpipe.methods.device_loop import BatchForward

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 5, padding=2).eval()  # asymmetric kernels: flips change its output
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    run_ = BatchForward(conv, "cpu", 2, mirror=True)
    got = run_(run_.stage(x)).astype(np.float32)
    with torch.inference_mode():
        t = torch.from_numpy(x)
        y = sum(conv(t.flip(a)).flip(a) if a else conv(t) for a in [(), (2,), (3,), (2, 3)]) / 4
    np.testing.assert_allclose(got, (y[:, 1:] - y[:, :1]).numpy(), atol=2e-3)
    method = {"name": "model", "model": str(tiny_model), "patch_size": 128, "tta": "mirror"}
    maps = [class_map(run(client, tmp_path / f"m{t}", input=str(SCENE), tile_size=t, method=method))
            for t in (256, 512)]
    np.testing.assert_array_equal(maps[0], maps[1])
    plain = class_map(run(client, tmp_path / "plain", input=str(SCENE), tile_size=256,
                          method={**method, "tta": "none"}))
    assert 0.5 < (plain == maps[0]).mean() < 1.0  # the same model, a little different where flips disagree


def test_probabilities_and_confidence_on_request(tmp_path, client, tiny_model):
    """Softmax of the blended logits: sums to 1, its arg-max is the class map, the same for any tile size;
    probabilities.tif (read back with GDAL) holds them as bytes, one band per class then the confidence."""
    import zarr

    method = {"name": "model", "model": str(tiny_model), "patch_size": 128}
    outs = [run(client, tmp_path / f"p{t}", input=str(SCENE), tile_size=t, method=method, probabilities=True)
            for t in (256, 512)]
    probs = [np.asarray(zarr.open_array(o.result, path="probability", mode="r")[:], np.float32) for o in outs]
    np.testing.assert_array_equal(probs[0], probs[1])
    p, cls = probs[0], class_map(outs[0])
    assert p.shape == (3, *cls.shape) and np.abs(p.sum(axis=0) - 1).max() < 3e-3
    decided = np.sort(p, axis=0)[-1] - np.sort(p, axis=0)[-2] > 2e-3  # float16 ties aside
    assert (p.argmax(axis=0) == cls)[decided].all() and decided.mean() > 0.5
    tif = tmp_path / "p256" / "probabilities.tif"
    assert tif in outs[0].exports
    with rasterio.open(tif) as ds, rasterio.open(tmp_path / "p256" / "segmentation.tif") as seg:
        assert ds.count == 4 and ds.descriptions == ("a", "b", "c", "confidence") and ds.dtypes[0] == "uint8"
        assert ds.crs == seg.crs and ds.transform == seg.transform and ds.overviews(1)
        assert ds.profile["blockxsize"] == 512 and ds.nodata == 255
        bands = ds.read()
    np.testing.assert_array_equal(bands[:3], np.rint(p * 254).astype(np.uint8))
    np.testing.assert_array_equal(bands[3], np.rint(p.max(axis=0) * 254).astype(np.uint8))


def test_probabilities_are_refused_for_a_method_without_them(tmp_path):
    r = cli(tmp_path, {"input": str(SCENE), "output": str(tmp_path / "o"), "method": {"name": "otsu"},
                       "probabilities": True})
    assert r.returncode == 2 and "probabilities come from a model" in r.stderr and not (tmp_path / "o").exists()


ARCH = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}


def _plain_unet(seed):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kwargs = {**ARCH, "conv_op": torch.nn.Conv2d, "norm_op": torch.nn.InstanceNorm2d, "nonlin": torch.nn.LeakyReLU}
    torch.manual_seed(seed)
    return PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=False, **kwargs).eval()


def _nnunet_folder(root, nets, intensity):
    """A trained-model folder as nnU-Net v2 writes it, checkpoints with the non-tensor entries nnU-Net keeps."""
    folder = root / "Dataset501_Buildings" / "nnUNetTrainer__nnUNetPlans__2d"
    folder.mkdir(parents=True)
    plans = {"dataset_name": "Dataset501_Buildings", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1],
             "configurations": {"2d": {"patch_size": [128, 128], "spacing": [0.5, 0.5], "batch_size": 12,
                                       "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                                       "architecture": {"network_class_name":
                                                        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                                        "arch_kwargs": ARCH,
                                                        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                                "nonlin"]}}},
             "foreground_intensity_properties_per_channel": {"0": intensity}}
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "pan"},
                                                     "labels": {"background": 0, "building": 1},
                                                     "numTraining": 1, "file_ending": ".tif"}))
    for k, net in enumerate(nets):
        (folder / f"fold_{k}").mkdir()
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 1000,
                    "inference_allowed_mirroring_axes": (0, 1),
                    "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)]},
                    "init_args": {"plans": plans, "configuration": "2d", "fold": k, "device": torch.device("cpu")}},
                   folder / f"fold_{k}" / "checkpoint_final.pth")
    return folder


class _Averaged(torch.nn.Module):
    def __init__(self, nets):
        super().__init__()
        self.a, self.b = nets

    def forward(self, x):
        return (self.a(x) + self.b(x)) / 2


def test_an_nnunet_folder_runs_its_folds_as_an_ensemble_with_its_ct_normalisation(tmp_path, client):
    """Two folds, CT normalisation from the plans: the class map of the same two networks averaged, exported
    as TorchScript with the same clip-then-standardise normalisation in its card, through the same path."""
    pytest.importorskip("dynamic_network_architectures")
    nets = [_plain_unet(1), _plain_unet(2)]
    intensity = {"mean": 480.0, "std": 260.0, "percentile_00_5": 120.0, "percentile_99_5": 1400.0,
                 "min": 0.0, "max": 2047.0, "median": 450.0}
    folder = _nnunet_folder(tmp_path, nets, intensity)
    ts = tmp_path / "ensemble.ts"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(_Averaged(nets).eval(), torch.zeros(1, 1, 128, 128)), str(ts))
    card_path(ts).write_text(yaml.safe_dump({
        "format": "torchscript", "in_channels": 1, "n_classes": 2,
        "normalisation": {"kind": "meanstd", "mean": [480.0], "std": [260.0], "low": [120.0], "high": [1400.0]}}))
    job = {"input": str(SCENE), "tile_size": 256}
    got = run(client, tmp_path / "nn", **job, method={"name": "model", "model": str(folder), "patch_size": 128})
    ref = class_map(run(client, tmp_path / "ts", **job, method={"name": "model", "model": str(ts),
                                                               "patch_size": 128}))
    assert (class_map(got) == ref).mean() > 0.999 and 0 < ref.mean() < 1
    import zarr

    assert zarr.open_group(got.result, mode="r").attrs["class_names"] == ["background", "building"]


def test_an_nnunet_folder_segpipe_cannot_read_is_refused_in_one_line(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    folder = _nnunet_folder(tmp_path, [_plain_unet(1)], {"mean": 1.0, "std": 1.0})  # no percentiles
    r = cli(tmp_path, {"input": str(SCENE), "output": str(tmp_path / "o"),
                       "method": {"name": "model", "model": str(folder), "patch_size": 128}})
    assert r.returncode == 2 and "CTNormalization without" in r.stderr and len(r.stderr.splitlines()) == 1
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    message = check_error(tmp_path, {"input": str(SCENE), "output": str(tmp_path / "o"),
                                     "method": {"name": "model", "model": str(folder), "patch_size": 128}})
    assert "'os.system' is not a torch.nn.* name" in message, message
    assert not (tmp_path / "o").exists()
