"""AWS CDK app (Python) for the certificate rotator's cloud backend; see infra/README.md."""
