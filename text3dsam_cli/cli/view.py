"""``text3dsam view``: thin wrapper over :mod:`text3dsam_cli.view`."""

from __future__ import annotations

import typer
from rich.markup import escape

from text3dsam_cli.cli.app import app, err_console, handle_errors, parse_triple
from text3dsam_cli.cli.model_cmds import MODEL_HELP
from text3dsam_cli.io import formats


@app.command("view")
@handle_errors
def view_command(
    input: str = typer.Argument(..., help=f"One scan: {formats.input_help()}.", show_default=False),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of the hub repo."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (= fp32, TF32 off), fp32, bf16, fp16 (CUDA only)."),
    mode: str = typer.Option("auto", "--mode", help="whole, sliding or auto, as in segment."),
    spacing: str = typer.Option(None, "--spacing", help="Sliding-window target spacing in mm, 'x,y,z' or one "
                                "number (as in segment)."),
    overlap: float = typer.Option(0.5, "--overlap", help="Sliding-window overlap (0..1)."),
    series: str = typer.Option(None, "--series", help="SeriesInstanceUID to read from a DICOM folder."),
    modality: str = typer.Option(None, "--modality", help="CT, MR, PT, US, ... (default: as in segment)."),
    window: str = typer.Option("soft_tissue", "--window", help="CT window the model sees (as in segment)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback makes the "
                             "scan and the model reachable from other computers (with the token; plain HTTP)."),
    port: int = typer.Option(8765, "--port", help="Port to listen on."),
    token: str = typer.Option(None, "--token", help="Access token the page's address and every API request must "
                              "carry (default: a new random one per server). Characters A-Z a-z 0-9 - _ . ~"),
    no_browser: bool = typer.Option(False, "--no-browser", help="Do not open the page in the default browser."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
) -> None:
    """Explore a scan in the browser: type a prompt, see its mask over the scan.

    Loads the model and the scan once, encodes the image once, then serves a local page (NiiVue viewer,
    prompt box, legend with volumes, downloads of the label map and sidecar) on http://HOST:PORT/?token=T:
    only a request with that access token gets the scan or runs the model. Ctrl-C stops it.
    """
    from text3dsam_cli.devices import set_threads
    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.model import load_model
    from text3dsam_cli.view import ViewSession, read_input
    from text3dsam_cli.view.app import check_token
    from text3dsam_cli.view.server import check_port, is_loopback, require_web_stack, serve

    require_web_stack()
    if token is not None:
        check_token(token)
    target_spacing = parse_triple(spacing, "--spacing", float, "1.5,1.5,3 (mm, x,y,z)")
    if not is_loopback(host):
        err_console.print(f"[bold yellow]warning:[/] listening on {escape(host)}: other computers can reach "
                          "this server; the token guards it, but plain HTTP is not encrypted, so anyone on the "
                          "network path can read the token and the scan", highlight=False)
    check_port(host, port)
    set_threads(threads)
    err_console.print("[dim]reading the scan, loading the model…[/]")
    item, volume = read_input(input, series)
    net = load_model(model, revision)
    segmenter = Segmenter(net, device=device, precision=precision, mode=mode, spacing=target_spacing,
                          overlap=overlap)
    session = ViewSession(segmenter, volume, item, modality=modality, window=window)
    seconds = session.encode()
    err_console.print(f"[dim]model {escape(str(net.source.get('model')))} on {segmenter.device}; image encoded "
                      f"in {seconds:.1f} s ({segmenter.mode} volume mode)[/]", highlight=False)

    def ready(url: str) -> None:
        err_console.print(f"viewer at [bold]{url}[/] (Ctrl-C stops it)", highlight=False)

    serve(session, host, port, open_browser=not no_browser, on_ready=ready, token=token)
    err_console.print("[dim]viewer stopped[/]")
