"""The DICOM sink's guard against pynetdicom's reactor taking a C-STORE response meant for the sender."""

from __future__ import annotations

from io import BytesIO

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from wm.pynetdicom_patches import keep_responses

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def c_store(**fields: object) -> C_STORE:
    """A CT image storage C-STORE primitive with ``fields`` set: a request or a response."""
    message = C_STORE()
    message.AffectedSOPClassUID = CT_IMAGE_STORAGE
    message.AffectedSOPInstanceUID = "1.2.3.4"
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def guarded_association() -> tuple[Association, list[C_STORE]]:
    """A requestor association (never connected) whose reactor hands requests to a recorder."""
    assoc = Association(AE(), "requestor")
    served: list[C_STORE] = []
    setattr(assoc, "_serve_request", lambda msg, context_id: served.append(msg))  # noqa: B010
    keep_responses(assoc)
    return assoc, served


def test_a_response_the_reactor_takes_goes_back_to_the_waiting_sender() -> None:
    assoc, served = guarded_association()
    response = c_store(MessageIDBeingRespondedTo=1, Status=0x0000)
    assert response.is_valid_response
    assoc._serve_request(response, 3)
    assert served == []
    assert assoc.dimse.get_msg(block=False) == (3, response)


def test_a_request_from_the_peer_is_still_served() -> None:
    assoc, served = guarded_association()
    request = c_store(MessageID=1, Priority=2, DataSet=BytesIO(b"\x00"))
    assert request.is_valid_request
    assoc._serve_request(request, 1)
    assert served == [request]
    assert assoc.dimse.get_msg(block=False) == (None, None)
