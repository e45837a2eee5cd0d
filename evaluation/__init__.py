"""Evaluating PVC with lmms-eval: `lmms-eval --model pvc --model_args pretrained=PATH ...`.

lmms-eval finds the model through this package's entry point (group `lmms_eval.models`), which calls
`lmms_eval_models`; the model itself is `lmms_eval_model.PVCLmmsEval`, imported only when a run asks for it.
The paper's settings per benchmark are in `presets`.
"""


def lmms_eval_models():
    """The entry point lmms-eval calls: PVC's model manifest (a chat-style model, fed the tasks' messages)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="pvc", chat_class_path="pvc.evaluation.lmms_eval_model.PVCLmmsEval")
