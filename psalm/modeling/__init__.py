"""PSALM model components. Importing this package registers them in their registries."""
from .backbone import PSALMSwinTransformer
