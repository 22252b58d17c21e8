"""The paper's recipe on Flickr30k (29k train / 1k test images); the `arg` variants
are those of vinvl_coco.py (see `config.apply_variants`)."""

from vldeformer_jax.config import apply_variants, default_config


def get_config(arg: str = ""):
  c = default_config()
  c.data_dir = "data/flickr30k_ir"
  c.init_model = "models/vinvl_base"
  c.eval_split = "test"
  c.eval_protocol = "all"
  c.batch_size = 1024
  c.total_steps = 8_000  # about 9 epochs of 29k images
  c.warmup_steps = 500
  apply_variants(c, arg)
  return c
