"""Fixtures of the training tests."""

import pytest

from spiking_moe.data import BatchLoader
from spiking_moe.training import Trainer, seed_everything


@pytest.fixture
def train(tiny_snn, two_class_data):
    """``train(out_dir, config, *, model=None, callbacks=(), data=None, **trainer_kwargs)`` ->
    ``(trainer, result)``: the closed Trainer after fitting (the tiny SNN by default, seeded
    with 0 before it is built) on the two-class data, validated on 40 other samples."""

    def run(out_dir, config, *, model=None, callbacks=(), data=None, **kwargs):
        seed_everything(0)
        model = model or tiny_snn()
        data = data or two_class_data()
        loader = BatchLoader(data, config.batch_size, shuffle=True, seed=config.seed)
        val = BatchLoader(two_class_data(40, seed=1), 20)
        trainer = Trainer(
            model, loader, config, out_dir=out_dir, val_loader=val, callbacks=callbacks, **kwargs
        )
        result = trainer.fit()
        trainer.close()
        return trainer, result

    return run
