"""Deploy the core: the control plane and the orchestrator, in this process."""

import asyncio

from conveyor import deploy_core

if __name__ == "__main__":
    asyncio.run(deploy_core())
