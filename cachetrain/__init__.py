"""cachetrain: greedy layerwise CNN training on cached Zarr features.

Data flow: dataset (cachetrain.data.tensors) -> stage (cachetrain.models) trained by cachetrain.train.trainer ->
cache (cachetrain.cache) -> loader (cachetrain.cache.loader) -> next stage; cachetrain.train.greedy runs the loop
and cachetrain.cli is the command line.
"""

__version__ = "0.1.0"
