"""The steps of the image build (images/build.py is the driver): project facts, layers,
the Debian base, the Python dependencies, the app, the OCI archives and the SBOMs."""
