"""What a client can ask about a model, answered once for both front ends: its versions' states
(GetModelStatus) and its signatures (GetModelMetadata). gRPC sends these messages as they are, REST as JSON,
as TF Serving's get_model_status_impl and get_model_metadata_impl serve both of its APIs.
"""

from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from serving.models import ModelManager

SIGNATURE_DEF_FIELD = "signature_def"  # the one metadata field TF Serving knows


def model_status(manager: ModelManager, name: str, version: int | None = None,
                 label: str | None = None) -> get_model_status_pb2.GetModelStatusResponse:
    """Every version's state, or the one version asked for (by number or label); NOT_FOUND for an unknown model,
    label or version."""
    model = manager.model(name)
    if label:
        version = model.resolve(label=label).version
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in model.statuses(version):
        entry = response.model_version_status.add(version=status.version)
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state)
        entry.status.error_code = status.error_code
        entry.status.error_message = status.error_message
    return response


def model_metadata(manager: ModelManager, name: str, version: int | None = None,
                   label: str | None = None) -> tuple[int, get_model_metadata_pb2.SignatureDefMap]:
    """The version that answers (the latest without a version or label) and what TF Serving returns under
    "signature_def": every SignatureDef of its MetaGraph."""
    with manager.acquire(name, version, label) as servable:
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for signature_name, signature in servable.signature_defs.items():
            signatures.signature_def[signature_name].CopyFrom(signature)
        return servable.version, signatures
