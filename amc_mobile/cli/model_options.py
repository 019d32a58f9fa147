"""The flags that go with a model reference on every command: --model-kwargs, --weights, --input-shape.

A model reference is a registry name, a pruned-model or checkpoint folder, a `.pte` (where a command
measures programs), `FILE.py:FACTORY` or `package.module:FACTORY` (a callable returning an nn.Module)."""

from __future__ import annotations

import argparse

from amc_mobile.model_io import ModelOptions, parse_input_shape, parse_kwargs

MODEL_HELP = ("registry name, pruned-model or checkpoint folder, or FILE.py:FACTORY / package.module:FACTORY "
              "(a callable returning an nn.Module)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options (for FILE.py:FACTORY and registry models)")
    g.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='keyword arguments of the factory, e.g. \'{"width": 0.5}\'')
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="a state_dict to load into the model (read with weights_only=True: no pickle)")
    g.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="the input shape when the model has no `input_shape` attribute")


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(parse_kwargs(args.model_kwargs), args.weights, parse_input_shape(args.input_shape))
