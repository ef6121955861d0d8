"""fa2-jax: FlashAttention-2 for JAX, as Pallas GPU kernels."""
from fa2_jax.attention import flash_attention
from fa2_jax.config import BlockSizes, default_block_sizes
from fa2_jax.reference import attention_reference
from pallas_kernels.mosaic_tiles import MosaicBlocks, default_mosaic_blocks
from fa2_jax.ring import (from_zigzag, ring_attention, ring_attention_fn,
                          to_zigzag, zigzag_indices)

__version__ = "0.1.0"

__all__ = ["flash_attention", "BlockSizes", "default_block_sizes",
           "MosaicBlocks", "default_mosaic_blocks",
           "attention_reference", "ring_attention", "ring_attention_fn",
           "to_zigzag", "from_zigzag", "zigzag_indices", "__version__"]
