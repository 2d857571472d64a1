"""Names the config offers as choices and the torch-backed registries implement, kept free of torch."""

NETWORK_NAMES: tuple[str, ...] = (
    "unet",
    "monai_unet",
    "basic_unet",
    "basic_unet_plus_plus",
    "attention_unet",
    "dynunet",
    "segresnet",
)
"""Every ``model.name``: the networks of :data:`acdc_prune.models.registry.NETWORKS`, in its order."""
