"""``text3dsam pacs``: DICOMweb commands (``pacs search``); thin wrappers over :mod:`text3dsam_cli.io.dicomweb`."""

from __future__ import annotations

import json
import re

import typer

from text3dsam_cli.cli.app import app, handle_errors
from text3dsam_cli.errors import UsageError

pacs_app = typer.Typer(help="Find studies on a DICOMweb server (PACS, Orthanc, dcm4chee, cloud); see docs/pacs.md.",
                       no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")

_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


@pacs_app.command("search")
@handle_errors
def search_command(
    base_url: str = typer.Argument(..., help="DICOMweb service root, e.g. http://localhost:8042/dicom-web.",
                                   show_default=False),
    modality: str = typer.Option(None, "--modality", help="Only studies with a series of this modality (CT, MR, "
                                 "...)."),
    study_date: str = typer.Option(None, "--study-date", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end "
                                   "may be left open)."),
    patient_id: str = typer.Option(None, "--patient-id", help="PatientID."),
    accession: str = typer.Option(None, "--accession", help="AccessionNumber."),
    limit: int = typer.Option(None, "--limit", help="At most this many studies."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line (url, StudyInstanceUID, "
                                 "ModalitiesInStudy, StudyDate, NumberOfStudyRelatedInstances, PatientID, "
                                 "AccessionNumber, StudyDescription) instead of one URL per line."),
    dicomweb_token: str = typer.Option(None, "--dicomweb-token", help="Bearer token (default: $DICOMWEB_TOKEN; "
                                       "basic auth: $DICOMWEB_USER/$DICOMWEB_PASSWORD).", show_default=False),
) -> None:
    """Search studies (QIDO-RS) and print one study URL per line: the input of 'text3dsam segment -'.

    Exit status: 0 (also when nothing matches), 1 the server failed or refused, 2 usage error.
    """
    from text3dsam_cli.io import dicomweb

    if not dicomweb.is_url(base_url):
        raise UsageError(f"{base_url}: not an http(s) DICOMweb URL")
    if study_date is not None and (not study_date or not _DATE.match(study_date) or study_date == "-"):
        raise UsageError(f"--study-date {study_date!r}: give YYYYMMDD or YYYYMMDD-YYYYMMDD")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    filters = {key: text for key, text in (("ModalitiesInStudy", modality), ("StudyDate", study_date),
                                           ("PatientID", patient_id), ("AccessionNumber", accession)) if text}
    client = dicomweb.Client(base_url, dicomweb.credentials(dicomweb_token, base_url))
    for record in client.search_studies(filters, limit):
        typer.echo(json.dumps(record) if as_json else record["url"])
