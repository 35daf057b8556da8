"""The DreamBooth tab (gradio): `tab.build(host)` for the webui, `app.launch(root, host, port)` standalone."""
