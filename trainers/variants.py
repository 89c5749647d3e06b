"""Generate nnU-Net-style ``Trainer_5epochs`` variants without writing one class per length by hand."""

from typing import Dict, Iterable

DEFAULT_EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500)


def epoch_variant_name(base_name: str, epochs: int) -> str:
    return f"{base_name}_{epochs}epoch" + ("" if epochs == 1 else "s")


def define_epoch_variants(base: type, namespace: Dict[str, object],
                          epochs: Iterable[int] = DEFAULT_EPOCH_VARIANTS) -> None:
    """Create ``{base}_{N}epochs`` subclasses in ``namespace`` (a module's globals, so they pickle and are found).

    The length is a class attribute read by ``nnsslTrainerMixin.initialize``, so it wins over whatever the base
    trainer's ``__init__`` sets, and the ``nnssl_num_epochs`` variable still wins over it.
    """
    for n in epochs:
        name = epoch_variant_name(base.__name__, n)
        namespace[name] = type(name, (base,), {
            "__module__": namespace["__name__"],
            "__qualname__": name,
            "__doc__": f"{base.__name__} for {n} epoch{'' if n == 1 else 's'}.",
            "fixed_num_epochs": n,
        })
