"""mysproj: reproduce and extend *Mysterious Projections* (Verma et al., 2024) on Kubernetes."""

__version__ = "0.1.0"
