"""The internal node: SSH/SFTP service, users, storage and the links to the gateway."""
import warnings

# asyncssh (pinned below 2.25) names cryptography's DSA classes when it is imported, and
# cryptography 47 and later warns about that on stderr: ten lines before every command's
# output and in every worker's log. The node offers no DSA (internal.ssh.algorithms).
warnings.filterwarnings("ignore", message=r"DSA is deprecated", module=r"asyncssh(\.|$)")
