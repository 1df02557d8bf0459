import json

import pytest

from cacnb.config import (PRESETS, Config, ConfigError, apply_overrides, load_config, per_rank_batch,
                          save_config, valid_keys)


def official_voc_r50_1over8(data_dir="/data/VOCtrainval_11-May-2012"):
    """Built like the official configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json."""
    return {
        "name": "CAC", "experim_name": "voc_cac_deeplabv3+_resnet50_1over8_datalist0", "dataset": "voc",
        "data_dir": data_dir, "datalist": 0, "n_gpu": 2, "n_labeled_examples": 1323, "diff_lrs": True,
        "ramp_up": 0.1, "unsupervised_w": 30, "ignore_index": 255, "lr_scheduler": "Poly",
        "use_weak_lables": False, "weakly_loss_w": 0.4, "pretrained": True, "random_seed": 42,
        "model": {"supervised": False, "semi": True, "supervised_w": 1, "sup_loss": "CE", "layers": 50,
                  "downsample": True, "proj_final_dim": 128, "out_dim": 256, "backbone": "deeplab_v3+",
                  "pos_thresh_value": 0.75, "weight_unsup": 0.1, "epoch_start_unsup": 5, "selected_num": 6400,
                  "temp": 0.1, "step_save": 1, "stride": 8},
        "optimizer": {"type": "SGD", "args": {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9}},
        "train_supervised": {"batch_size": 8, "crop_size": 320, "shuffle": True, "base_size": 400, "scale": True,
                             "augment": True, "flip": True, "rotate": False, "blur": False,
                             "split": "train_supervised", "num_workers": 8},
        "train_unsupervised": {"batch_size": 8, "crop_size": 320, "shuffle": True, "base_size": 400,
                               "scale": True, "augment": True, "flip": True, "rotate": False, "blur": False,
                               "split": "train_unsupervised", "num_workers": 8, "iou_bound": [0.1, 1.0],
                               "stride": 8},
        "val_loader": {"batch_size": 2, "val": True, "split": "val", "shuffle": False, "num_workers": 4},
        "trainer": {"epochs": 80, "save_dir": "saved/", "save_period": 1, "monitor": "max Mean_IoU",
                    "early_stop": 100, "tensorboardX": True, "log_dir": "saved/", "log_per_iter": 20, "val": True,
                    "val_per_epochs": 1},
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.data.crop_size % cfg.data.stride == 0


def test_paper_settings_in_voc_presets():
    cfg = load_config("voc_r50_1323")
    assert (cfg.train.epochs, cfg.train.iters_per_epoch, cfg.train.batch_size, cfg.train.batch_size_unsup) == \
        (80, 1157, 8, 8)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.backbone_lr_mult) == \
        (0.01, 0.9, 1e-4, 0.1)
    assert (cfg.loss.temperature, cfg.loss.weight_unsup, cfg.loss.pos_thresh, cfg.loss.selected_num) == \
        (0.1, 0.1, 0.75, 6400)
    assert cfg.loss.epoch_start_unsup == 5 and cfg.loss.step_save == 1
    assert load_config("voc_r101_1323").loss.step_save == 2
    assert load_config("cityscapes_r50_744").loss.step_save == 0
    assert {n for n in PRESETS if n.startswith("voc_r50_")} == {f"voc_r50_{n}" for n in (662, 1323, 1464, 2645)}


def test_overrides_are_typed():
    cfg = load_config("synthetic", ["train.epochs=3", "loss.temperature=0.2", "data.photometric=false",
                                    "data.iou_bound=[0.2, 0.9]", "model.pretrained=null", "train.run_name=x"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.loss.temperature == 0.2
    assert cfg.data.photometric is False
    assert cfg.data.iou_bound == (0.2, 0.9)
    assert cfg.model.pretrained is None
    assert cfg.train.run_name == "x"
    # mappings (papermill parameters) carry native types
    cfg = load_config("synthetic", {"train.epochs": 4, "train.amp": True})
    assert cfg.train.epochs == 4 and cfg.train.amp is True


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("synthetic", {"train.epoch": 3})
    msg = str(e.value)
    assert "train.epoch" in msg and "train.epochs" in msg and "data.crop_size" in msg


@pytest.mark.parametrize("override, fragment", [
    ({"train.epochs": "three"}, "integer"),
    ({"train.amp": "maybe"}, "true/false"),
    ({"data.iou_bound": "[0.1]"}, "2 values"),
    ({"train.mode": "weak"}, "train.mode"),
    ({"data.crop_size": 321}, "multiple"),
    ({"model.output_stride": 32}, "output_stride"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("synthetic", override)


def test_indivisible_batch_is_a_clear_error():
    assert per_rank_batch(8, 4) == 2
    with pytest.raises(ConfigError, match="train.batch_size=6.*world size \\(4\\)"):
        per_rank_batch(6, 4)


def test_json_round_trip(tmp_path):
    cfg = load_config("voc_r101_1323", {"train.epochs": 7})
    path = save_config(cfg, tmp_path / "c.json")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    # our JSON files are strict too
    d = json.loads(path.read_text())
    d["train"]["bogus"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="train.bogus"):
        load_config(tmp_path / "bad.json")


def test_official_voc_json_maps_every_setting(tmp_path):
    path = tmp_path / "voc_cac_deeplabv3+_resnet50_1over8_datalist0.json"
    path.write_text(json.dumps(official_voc_r50_1over8()))
    cfg = load_config(path)
    assert cfg.data.dataset == "voc" and cfg.data.n_labeled == 1323
    assert cfg.data.data_dir == "/data/VOCtrainval_11-May-2012"
    assert cfg.model.backbone == "resnet50" and cfg.model.proj_dim == 128
    assert cfg.train.mode == "semi" and cfg.train.seed == 42 and cfg.train.epochs == 80
    assert (cfg.train.batch_size, cfg.train.batch_size_unsup) == (8, 8)
    assert (cfg.data.crop_size, cfg.data.base_size, cfg.data.iou_bound, cfg.data.stride) == (320, 400, (0.1, 1.0), 8)
    assert (cfg.loss.pos_thresh, cfg.loss.temperature, cfg.loss.weight_unsup) == (0.75, 0.1, 0.1)
    assert (cfg.loss.selected_num, cfg.loss.step_save, cfg.loss.epoch_start_unsup) == (6400, 1, 5)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.backbone_lr_mult) == \
        (0.01, 1e-4, 0.9, 0.1)
    assert cfg.train.log_every == 20 and cfg.train.val_every == 1


def test_official_json_variants():
    d = official_voc_r50_1over8()
    d["model"].update(layers=101, supervised=True, semi=False, step_save=2)
    d["diff_lrs"] = False
    d["pretrained"] = False
    cfg = load_config(d, {"data.data_dir": "/elsewhere"})
    assert cfg.model.backbone == "resnet101" and cfg.train.mode == "supervised"
    assert cfg.optim.backbone_lr_mult == 1.0 and cfg.model.pretrained is None
    assert cfg.data.data_dir == "/elsewhere"
    city = official_voc_r50_1over8()
    city.update(dataset="cityscapes", n_labeled_examples=372)
    city["train_supervised"].update(crop_size=720, base_size=2048, jitter=True)
    city["train_unsupervised"].update(crop_size=720, base_size=2048)
    cfg = load_config(city)
    assert cfg.data.dataset == "cityscapes" and cfg.data.num_classes == 19 and cfg.data.color_jitter


def test_unknown_preset_or_missing_file():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("voc_r50_9999")


def test_valid_keys_cover_sections():
    keys = valid_keys()
    for k in ("data.data_dir", "model.backbone", "loss.neg_total", "optim.lr", "train.resume"):
        assert k in keys
    assert apply_overrides(Config(), {}).to_dict() == Config().to_dict()


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["optimizer"]["args"].update(lr="fast"), "optimizer.args.lr"),
    (lambda d: d["trainer"].update(early_stop="never"), "trainer.early_stop"),
    (lambda d: d["train_unsupervised"].update(stride=None), "train_unsupervised.stride"),
    (lambda d: d["model"].update(layers="fifty"), "model.layers"),
    (lambda d: d["train_unsupervised"].update(crop_size=321), "train_unsupervised.crop_size"),
    (lambda d: d.update(n_labeled_examples=[1]), "n_labeled_examples"),
])
def test_official_errors_are_wrapped_once(edit, key):
    d = official_voc_r50_1over8()
    edit(d)
    with pytest.raises(ConfigError) as e:
        load_config(d)
    message = str(e.value)
    assert key in message
    assert message.count("official config:") == 1 and "\n" not in message


def test_unknown_key_names_the_closest_one():
    with pytest.raises(ConfigError, match=r"Did you mean \['train.epochs'"):
        apply_overrides(Config(), {"train.epcohs": 3})
