"""The Text3DSAM model: one module shared by segment, train, finetune and eval."""

from text3dsam_cli.model.config import Text3DSAMConfig
from text3dsam_cli.model.decoder import ImageContext
from text3dsam_cli.model.hub import ModelLocation, download_model, resolve_model
from text3dsam_cli.model.loading import load_model
from text3dsam_cli.model.saving import save_model
from text3dsam_cli.model.text3dsam import Text3DSAM

__all__ = ["ImageContext", "ModelLocation", "Text3DSAM", "Text3DSAMConfig", "download_model", "load_model",
           "resolve_model", "save_model"]
