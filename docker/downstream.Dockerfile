# The compose file's downstream: Debian's Postfix accepting mail for example.test into
# /var/mail/vhosts/example.test/<user>/ (Maildir), as the mail server behind mailgate would.
FROM debian:bookworm-20241202-slim

# $1 is the regexp map's back-reference, for Postfix, not the shell
# hadolint ignore=SC2016
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix=3.7.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 5000 vmail \
    && useradd --system --uid 5000 --gid 5000 --home-dir /var/mail/vhosts --shell /usr/sbin/nologin vmail \
    && mkdir -p /var/mail/vhosts && chown vmail:vmail /var/mail/vhosts \
    && postconf -e 'myhostname=downstream.example.test' 'mydestination=' \
        'inet_interfaces=all' 'inet_protocols=ipv4' 'maillog_file=/dev/stdout' \
        'virtual_mailbox_domains=example.test' 'virtual_mailbox_base=/var/mail/vhosts' \
        'virtual_mailbox_maps=regexp:/etc/postfix/vmailbox' 'virtual_minimum_uid=5000' \
        'virtual_uid_maps=static:5000' 'virtual_gid_maps=static:5000' \
    && printf '/^([^@+]+)(\\+[^@]*)?@example\\.test$/ example.test/$1/\n' > /etc/postfix/vmailbox

EXPOSE 25
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD ["postfix", "status"]
CMD ["postfix", "start-fg"]
