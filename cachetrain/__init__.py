"""cachetrain: greedy layerwise CNN training on cached Zarr features.

Data flow: dataset (cachetrain.data) -> stage (cachetrain.models) trained by cachetrain.trainer ->
cache (cachetrain.cache) -> loader (cachetrain.loader) -> next stage; cachetrain.greedy runs the loop
and cachetrain.cli is the command line.
"""

__version__ = "0.1.0"
