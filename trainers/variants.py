"""Generate nnU-Net-style ``Trainer_5epochs`` variants without writing one class per length by hand."""

from dataclasses import replace
from typing import Dict, Iterable

DEFAULT_EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500)


def epoch_variant_name(base_name: str, epochs: int) -> str:
    return f"{base_name}_{epochs}epoch" + ("" if epochs == 1 else "s")


def define_epoch_variants(base: type, namespace: Dict[str, object],
                          epochs: Iterable[int] = DEFAULT_EPOCH_VARIANTS) -> None:
    """Create ``{base}_{N}epochs`` subclasses in ``namespace`` (a module's globals, so they pickle and are found).

    A trainer with a recipe (pretraining, fine-tuning) gets ``replace(recipe, num_epochs=N)``; nnU-Net's own recipe
    (``nnsslTrainer``) gets ``fixed_num_epochs``, read by ``nnsslTrainerMixin.initialize``. The ``nnssl_num_epochs``
    variable still wins over both.
    """
    for n in epochs:
        name = epoch_variant_name(base.__name__, n)
        namespace[name] = type(name, (base,), {
            "__module__": namespace["__name__"],
            "__qualname__": name,
            "__doc__": f"{base.__name__} for {n} epoch{'' if n == 1 else 's'}.",
            **length_attributes(base, n),
        })


RECIPE_ATTRIBUTES = ("recipe", "primus_recipe")  # fine-tuning trainers carry one recipe per architecture family


def length_attributes(base: type, epochs: int) -> Dict[str, object]:
    recipes = {name: getattr(base, name) for name in RECIPE_ATTRIBUTES if getattr(base, name, None) is not None}
    if recipes:
        return {name: replace(recipe, num_epochs=epochs) for name, recipe in recipes.items()}
    return {"fixed_num_epochs": epochs}
