/*
 * hello: the smallest useful uigniter app. An HTTP/1.0 server on port 8080
 * (or argv[1]) that answers every request with a greeting and the guest's
 * hostname. It stops cleanly on SIGTERM, which is how the guest init asks.
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;

static void on_term(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 8080;
    struct sigaction sa = { .sa_handler = on_term };
    sigaction(SIGTERM, &sa, NULL); /* no SA_RESTART: accept() returns EINTR */

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0) {
        perror("hello: cannot listen");
        return 1;
    }
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    printf("hello: listening on :%d as %s\n", port, host);
    fflush(stdout);

    while (!stopping) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR) continue;
            perror("hello: accept");
            return 1;
        }
        char buf[2048];
        (void)read(c, buf, sizeof buf); /* the request itself does not matter */
        /* Asked each time: a clone of a snapshot of this app has its own name. */
        gethostname(host, sizeof host - 1);
        char body[160];
        int n = snprintf(body, sizeof body, "Hello from uigniter! (%s)\n", host);
        char head[160];
        int h = snprintf(head, sizeof head, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", n);
        /* MSG_NOSIGNAL: a client that hung up early must not kill the server with SIGPIPE. */
        (void)send(c, head, h, MSG_NOSIGNAL);
        (void)send(c, body, n, MSG_NOSIGNAL);
        close(c);
    }
    printf("hello: stopping on SIGTERM\n");
    return 0;
}
