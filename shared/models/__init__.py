"""Model builders shared by the distiller, the gateway and the server (these modules need torch and timm)."""
