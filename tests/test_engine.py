"""Training on real images: FastNet passes 60% on a 5,000-image subset in 5 epochs; History and checkpoints."""

import torch

from lrlab.config import load_config
from lrlab import pipeline
from lrlab.run_folder import RunFolder


def test_short_training_run_beats_chance(cifar_dir, cache_dir, tmp_path):
    config = load_config(None, [f"data.path={cifar_dir}", f"data.cache_dir={cache_dir}",
                                "data.train_subset=5000", "data.val_subset=1000", "data.test_subset=1000", "data.crop_padding=2",
                                "data.cutout=0", "data.flip=alternate", "model.kwargs={width: 0.5}",
                                "train.epochs=5", "train.batch_size=100", "train.schedule=onecycle",
                                "train.max_lr=0.4", "train.nesterov=true", "train.label_smoothing=0.2"])
    setup = pipeline.prepare(config, range_test=False, train=True, explain=False)
    data, model = setup.data, setup.model
    assert (len(data.train), len(data.val), len(data.test)) == (5000, 1000, 1000)
    plan = pipeline.make_plan(setup, None)
    assert (plan.lr, plan.kind, plan.source) == (0.4, "peak", "train.max_lr")
    history = pipeline.train(setup, plan, run=RunFolder(tmp_path))
    accs = [r["val_acc"] for r in history.records]
    assert accs[-1] > 0.60  # the fast network learns in one short run; chance is 0.10
    assert history.records[-1]["lr"] < plan.lr / 100  # one-cycle ended near zero
    for name in ("history.csv", "history.json", "loss.png", "accuracy.png", "lr.png"):
        assert (tmp_path / name).stat().st_size > 0
    best = torch.load(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == history.best()["epoch"] and best["classes"] == data.classes
    model.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.pt")["model"])
    from lrlab.engine import evaluate
    _, acc = evaluate(model, pipeline.eval_loader(setup, data.val), setup.compute)
    assert abs(acc - accs[-1]) < 1e-9  # the last checkpoint is the last epoch's model
