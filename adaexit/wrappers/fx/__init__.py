"""``wrap`` for any torch.fx-traceable model: exits at dotted module paths, the model's own tail last.

``wrap(model, exits=["layer1", "layer2"])`` cuts the model's forward into consecutive pieces at the
outputs of the named submodules (names as ``model.named_modules()`` gives them, like
``torchvision.models.feature_extraction``; but the graph is *cut*, so later pieces run only on the rows
that did not exit). Every torchvision classification family splits this way, bit for bit.

How a model is split (:func:`split_model`):

1. **Tracing with maximal leaves.** ``_CutTracer`` (a ``torch.fx.Tracer``) makes every module that is not
   an ancestor of a requested exit a leaf: only the forward code of the root and of the containers on
   the way to an exit is traced; the blocks, the exit modules and the classifier become one
   ``call_module`` node each, which calls the original module object. So the pieces run the model's own
   code (``tail(stages(x)) == model(x)`` bit for bit, at the model's speed); code inside blocks that
   depends on ``self.training`` (dropout, stochastic depth), shape asserts and data-dependent control
   flow never meet the tracer; and the pieces hold the model's own modules and parameters (shared, not
   copied). The tracer records, for every module call, the value its forward returned: that value's node
   is the module's cut point.
2. **One value across each cut.** Nodes are in execution order. A cut after node ``c`` is valid iff the
   only value computed at or before ``c`` and used after it is ``c`` itself. Values that depend only on
   parameters and buffers (ViT's ``pos_embedding``) are *free*: recomputed in whichever piece uses them.
   Anything else crossing a cut is an error naming the value, its later user and the block being cut.
3. **Building the pieces.** Each segment of the node list is copied into its own ``fx.Graph`` with a
   placeholder for the incoming value and wrapped in an ``fx.GraphModule`` rooted at the model.
4. **Probing** (with ``example_input``): the traced graph runs once through an ``fx.Interpreter`` in eval
   mode under ``no_grad`` (BatchNorm statistics untouched), recording each exit's shape, from which its
   layout follows: ``nchw`` map, ``nhwc`` channels-last map (Swin), ``tokens`` ``[N, L, D]`` (ViT) or
   ``flat`` ``[N, D]``; and, for :func:`candidate_exits`, the FLOPs done before each cut.

:class:`ModelExits` holds the result: the model registered once as ``self.model`` (it owns the parameters
and its ``state_dict`` keys, prefixed ``model.``), the pieces held unregistered (their submodules *are*
the model's), fresh exit heads registered as ``exit_heads``. The model's own path from the last exit to
its output (whatever it holds: ``Sequential(Dropout, Linear)``, ViT's ``heads``, SqueezeNet's conv
classifier, functional pooling or flatten) is the last stage; its head passes the logits to the gate.

Modules, in import order: ``tracing`` (the tracer), ``liveness`` (what crosses a cut), ``layouts`` (probing,
:class:`CutPoint`), ``split`` (:func:`split_model`), ``candidates`` (:func:`candidate_exits`, :func:`pick_exits`),
``heads`` (default heads), ``model`` (:class:`ModelExits`, :func:`wrap`).
"""

from .candidates import candidate_exits, pick_exits
from .layouts import LAYOUTS, CutPoint
from .model import ModelExits, wrap
from .split import Split, split_model

__all__ = ["LAYOUTS", "CutPoint", "ModelExits", "Split", "candidate_exits", "pick_exits", "split_model", "wrap"]
