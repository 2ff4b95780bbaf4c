"""Known answers for the self-checks of the DKIM patches (gateway/patches.py): a message
signed twice (simple/simple on top of relaxed/relaxed) by a throwaway 1024-bit test key made
for this purpose (selector ``s1``, domain ``selftest.invalid``, which cannot exist), and that
key's DNS record, and the key itself (for the ARC sealer's check, which seals a known message
and compares with dkimpy's own seal). Nothing here is secret or trusted: the key signs nothing
but these vectors."""

from __future__ import annotations

KEY_NAME = b"s1._domainkey.selftest.invalid"
KEY_RECORD = (
    b'v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDdljuakvG46hRBD2MzN6EZCS'
    b'5F13lq75TpE0DGjw4YUM8+DEI88q21U9/zIk1le07qDOfif2gJI0Jm/RHFGmewgMYzvSfGh5VTYODBWE'
    b'g+R9hLeov9Zjj8o6jxLPUwUx3UfL7HcoA5G+JUdSQQh22C5bsKNQNPhMUNtlEI6UBH4QIDAQAB'
)
SIGNED = (
    b'DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=selftest.invalid;\r\n'
    b' i=@selftest.invalid; q=dns/txt; s=s1; t=1796689295; h=from : to :\r\n'
    b' subject; bh=KNdgWEhJB/KInJvvhlZondPuuUBWZvBN7FFKPMwGyXU=;\r\n'
    b' b=K/o/zL/nmFZjR4pivkpTafdvL61xHvHrv7rr+0fx+2ONYSj1Twl+HJ9oI7nXpiGPvpLp8\r\n'
    b' hAVZm3sfHDV3rDWjx4NdYXoKtUu11HODb3eRgJ9yQ5+DU5dh/ugix1TnXz8IiX8Y7rixWcH\r\n'
    b' YKsASMhVnv0KqcatrJUHtg8JHvyv6PY=\r\n'
    b'DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=selftest.invalid;\r\n'
    b' i=@selftest.invalid; q=dns/txt; s=s1; t=1796689295; h=from : to :\r\n'
    b' subject; bh=zN4aMiGCrlQSpA2KUPW+uvMxo8auFVrNMtaYIhXKwQw=;\r\n'
    b' b=VU5e6FE+7lRG5crNabpKQzc1rx1i+Blf1TpCUToke2XytFDyXT0w6DY4xZRiSwQljugK0\r\n'
    b' gdehMf5cf3u0JkaZreBoiwAS+spPdyPhInseHOkDN3uDi8HS3DPg+tTjG2NnInoVphwtSbR\r\n'
    b' w+jSuBxbzuB1ZGjOsYrDP9zK88hQR18=\r\n'
    b'From: Check <check@selftest.invalid>\r\n'
    b'To: x@selftest.invalid\r\n'
    b'Subject: known answer\r\n'
    b'Message-ID: <selftest@selftest.invalid>\r\n'
    b'\r\n'
    b'Known  answer\t body \r\n'
    b'\r\n'
    b'.line two\r\n'
    b'\r\n'
    b'\r\n'
)
PRIVATE_KEY = (
    b"-----BEGIN RSA PRIVATE KEY-----\n"
    b"MIICXQIBAAKBgQDdljuakvG46hRBD2MzN6EZCS5F13lq75TpE0DGjw4YUM8+DEI8\n"
    b"8q21U9/zIk1le07qDOfif2gJI0Jm/RHFGmewgMYzvSfGh5VTYODBWEg+R9hLeov9\n"
    b"Zjj8o6jxLPUwUx3UfL7HcoA5G+JUdSQQh22C5bsKNQNPhMUNtlEI6UBH4QIDAQAB\n"
    b"AoGAONz+urIO2fcn73I1cMVL0BLtDvs2q1yECDPqoYnAgjjqle+rZ9yW+ztk8w3Q\n"
    b"csRsAeAB+bvcRMwJlEhJMR2Pkd+Fi/Ys6mpFoBGo3rOhxhaZUZli4nL4Qd//llaf\n"
    b"oE6Epl299gy7twKy+0mrm0Lwg+e0O8tghxce2epdOSuli2ECQQD3b6+RON8nua8C\n"
    b"f9jhvIwqhw+JrMXCYmnEJCBOvoG0FgnV/TCzkQ1sGD64mHu3qNxRGzDn6Belwo/O\n"
    b"csxTs4H9AkEA5UGEoetNbwSswGR+scgZnfNQDaoI8RfcwXqsTVVLT+Sdplr/R0tr\n"
    b"J7y4asKb7VUP6Xfx59DOmkTfnHEqF3jgtQJANR0wXsgKfwiI3Mx8zdgfbnGXkEIa\n"
    b"IWPmuEfY945FYVbpvZmf/qvAade6fv2ccQw6Xt6rXNyhVt+w5uwVmFIMMQJBAN12\n"
    b"TjbQhKvjOzJbohwBbeWsXr/kauDjqUhqRboq1CbodPZ33zSzAV+QqiHPvyskScvC\n"
    b"J7hFeN+D+vM4Sm4EQiUCQQDuve4o0K4MUBs3X+LIuXayovO6bJf67pEms/vY5WfF\n"
    b"+nCkfytym71Oe60nPBolWFriZK3N1Sl/gudW1dgMZNxi\n"
    b"-----END RSA PRIVATE KEY-----\n"
)
AR_MESSAGE = (  # for sealing: an Authentication-Results of mx.selftest.invalid
    b"Authentication-Results: mx.selftest.invalid; spf=pass smtp.mailfrom=selftest.invalid;\r\n"
    b" dkim=pass header.d=selftest.invalid\r\n"
    b"From: Check <check@selftest.invalid>\r\nTo: x@selftest.invalid\r\n"
    b"Subject: known answer\r\n\r\nbody\r\n"
)
