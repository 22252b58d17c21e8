"""Put this folder on PYTHONPATH to run as on the GPU image, which lacks these modules:
each looks absent (`find_spec` returns None), as when it is not installed.

  PYTHONPATH=benchmarks/gpu_image bash benchmarks/gpu_train_check.sh --cpu-smoke
"""
import sys

ABSENT = {"ml_collections", "clu", "tensorflow", "tensorflow_datasets", "nltk", "faiss",
          "lemminflect", "tensorboard"}


class _HideAbsent:
  """Wraps one meta-path finder; finds nothing for the absent modules."""

  def __init__(self, inner):
    self.inner = inner

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ABSENT or not hasattr(self.inner, "find_spec"):
      return None
    return self.inner.find_spec(name, path, target)

  def __getattr__(self, name):
    return getattr(self.inner, name)


sys.meta_path[:] = [_HideAbsent(f) for f in sys.meta_path]
