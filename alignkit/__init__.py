"""alignkit: where inside a language model does post-training change it?

Data flows one way: config -> data/model -> train -> activations -> measures -> plots.
"""

__version__ = "0.1.0"
